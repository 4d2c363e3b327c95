"""`python -m gateway` with `tls`: it serves HTTPS, and SIGHUP after a certificate is renewed in
place gives new connections the new one."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.certs import Authority
from tests.polling import eventually
from tests.processes.procs import GatewayProcess
from tests.upstreams import make_echo_app


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_echo_app())


async def peer_certificate(url: str, context: ssl.SSLContext) -> bytes:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(
        host, int(port), ssl=context, server_hostname="localhost"
    )
    try:
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_gateway_serves_https_and_sighup_picks_up_a_renewed_certificate(
    tmp_path: Path,
    echo: TestServer,
) -> None:
    authority = Authority(tmp_path)
    first = authority.issue("gateway")
    config = tmp_path / "routes.yaml"
    config.write_text(
        "version: 1\nservices:\n"
        f"  echo: {{targets: [{str(echo.make_url('')).rstrip('/')}]}}\n"
        "routes:\n  - {prefix: /echo, service: echo}\n"
        f"tls: {{cert_file: {first.cert}, key_file: {first.key}}}\n"
    )
    client = authority.client_context()
    gateway = await GatewayProcess.start(config)
    url = gateway.url.replace("http://", "https://")
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/echo", ssl=client) as resp,
        ):
            assert resp.status == 200
            seen = await resp.json()
        assert ["X-Forwarded-Proto", "https"] in seen["headers"]
        assert await peer_certificate(url, client) == first.der

        second = authority.issue("renewed", first.cert, first.key)
        gateway.send_signal(signal.SIGHUP)

        async def renewed() -> bool:
            return await peer_certificate(url, client) == second.der

        await eventually(renewed, within=10.0)
    finally:
        assert await gateway.stop() == 0
