"""TLS: https targets verified (system CAs, a service's ca_file, or verify: false with a
warning), and the gateway's own listener over HTTPS with its certificate swapped on reload.
Certificates are made in fixtures (tests/certs.py).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.config.build import LoadResult, load_text
from gateway.config.tls import ServerTls
from gateway.runtime.state import Gateway
from tests.certs import Authority
from tests.gateway.conftest import GatewayTestServer
from tests.polling import eventually


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def commented_bundle(authority: Authority) -> Path:
    """The CA file as bundles come: with text around the PEM, not all of it ASCII."""
    bundle = authority.directory / "bundle.pem"
    bundle.write_text(f"# CA (Zürich)\n{authority.file.read_text()}\n", encoding="utf-8")
    return bundle


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello over {request.scheme}")


@pytest.fixture
async def tls_upstream(authority: Authority, aiohttp_server: AiohttpServer) -> TestServer:
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    issued = await asyncio.to_thread(authority.issue, "upstream")
    context = await asyncio.to_thread(authority.server_context, issued)
    return await aiohttp_server(app, ssl=context)


async def load(text: str) -> LoadResult:
    """Validation and compiling read the certificate files: off the event loop."""
    return await asyncio.to_thread(load_text, text, "routes.yaml", {})


def routes(url: str, tls: str = "") -> str:
    return (
        f"version: 1\nservices:\n  secure:\n    targets: [{url}]\n{tls}"
        "routes:\n  - {prefix: /, service: secure}\n"
    )


Serve = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(gateway: Gateway, context: ssl.SSLContext | None = None) -> TestServer:
        server = GatewayTestServer(gateway)
        await server.start_server(ssl=context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def get(
    server: TestServer, path: str = "/", context: ssl.SSLContext | bool = True
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url(path), ssl=context) as resp,
    ):
        return resp.status, await resp.text()


async def test_an_https_target_verified_with_the_services_ca_file_is_served(
    authority: Authority, tls_upstream: TestServer, serve: Serve
) -> None:
    url = str(tls_upstream.make_url("")).rstrip("/")
    bundle = await asyncio.to_thread(commented_bundle, authority)
    result = await load(routes(url, f"    tls: {{ca_file: {bundle}}}\n"))
    assert result.config is not None
    assert result.problems == []

    server = await serve(Gateway(result.config))

    assert await get(server) == (200, "hello over https")


async def test_an_https_target_signed_by_an_unknown_ca_is_502(
    tls_upstream: TestServer, serve: Serve
) -> None:
    url = str(tls_upstream.make_url("")).rstrip("/")
    result = await load(routes(url))  # the system's CAs do not know this test CA
    assert result.config is not None

    server = await serve(Gateway(result.config))
    status, body = await get(server)

    assert status == 502
    assert "its TLS certificate could not be verified" in body
    assert "127.0.0.1" not in body


async def test_verify_false_is_served_and_warned_about_on_every_load(
    tls_upstream: TestServer, serve: Serve
) -> None:
    url = str(tls_upstream.make_url("")).rstrip("/")
    text = routes(url, "    tls: {verify: false}\n")

    first, second = await load(text), await load(text)

    warning = (
        "routes.yaml:5:19: services.secure.tls.verify: warning: the certificates of this"
        " service's https targets are not checked"
    )
    assert [str(w) for w in first.warnings] == [warning]
    assert [str(w) for w in second.warnings] == [warning]
    assert first.config is not None
    server = await serve(Gateway(first.config))
    assert await get(server) == (200, "hello over https")


async def peer_certificate(server: TestServer, context: ssl.SSLContext, name: str) -> bytes:
    """The certificate a brand-new connection to the listener is shown (an IP address as
    `name` sends no SNI)."""
    assert server.port is not None
    _, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=context, server_hostname=name
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der: bytes = ssl_object.getpeercert(binary_form=True)
        return der
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_listener_serves_https_and_a_reload_gives_new_connections_the_new_cert(
    authority: Authority, echo_upstream: TestServer, serve: Serve
) -> None:
    first = await asyncio.to_thread(authority.issue, "gateway")
    echo = str(echo_upstream.make_url("")).rstrip("/")
    text = routes(echo) + f"tls: {{cert_file: {first.cert}, key_file: {first.key}}}\n"
    result = await load(text)
    assert result.config is not None
    assert result.config.tls is not None
    gateway = Gateway(result.config)
    gateway.tls = await asyncio.to_thread(ServerTls, result.config.tls)
    server = await serve(gateway, gateway.tls.context)
    client = await asyncio.to_thread(authority.client_context)

    status, body = await get(server, "/x", client)
    assert status == 200
    assert '"x-forwarded-proto", "https"' in body.lower()
    for name in ("localhost", "127.0.0.1"):
        assert await peer_certificate(server, client, name) == first.der

    second = await asyncio.to_thread(authority.issue, "rotated", first.cert, first.key)
    assert gateway.apply(await load(text + "# rotated\n"))

    async def rotated() -> bool:
        return await peer_certificate(server, client, "localhost") == second.der

    await eventually(rotated)
    assert await peer_certificate(server, client, "127.0.0.1") == second.der  # no SNI sent
    assert (await get(server, "/x", client))[0] == 200


def test_missing_certificate_and_key_files_are_reported_where_they_are_named(
    tmp_path: Path,
) -> None:
    text = routes("http://h:1") + (
        f"tls: {{cert_file: {tmp_path}/none.crt, key_file: {tmp_path}/none.key}}\n"
    )

    result = load_text(text, "routes.yaml", environ={})

    column = len("tls: {cert_file: ") + 1
    assert [str(e) for e in result.errors] == [
        f"routes.yaml:7:{column}: tls.cert_file: no such file",
        f"routes.yaml:7:{column + len(f'{tmp_path}/none.crt, key_file: ')}: tls.key_file:"
        " no such file",
    ]


def test_a_key_that_does_not_match_its_certificate_is_reported(
    authority: Authority,
) -> None:
    one, other = authority.issue("one"), authority.issue("other")
    text = routes("http://h:1") + f"tls:\n  cert_file: {one.cert}\n  key_file: {other.key}\n"

    result = load_text(text, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [
        "routes.yaml:8:14: tls.cert_file: the certificate and key do not load:"
        " not PEM, or the key does not match"
    ]


def test_a_ca_file_that_is_missing_or_holds_no_certificate_is_reported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    other = f"  other:\n    targets: [https://h:2]\n    tls: {{ca_file: {empty}}}\n"
    text = routes("https://h:1", f"    tls: {{ca_file: {tmp_path}/none.pem}}\n{other}")

    result = load_text(text, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [
        "routes.yaml:5:20: services.secure.tls.ca_file: no such file",
        "routes.yaml:8:20: services.other.tls.ca_file: holds no PEM CA certificate",
    ]
