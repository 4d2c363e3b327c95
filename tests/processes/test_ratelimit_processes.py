"""Rate limits shared through Redis by real gateway processes: `--workers 2`, and two separate
gateways on two ports, admit exactly `burst` of a burst between them, not twice that (§9)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.processes.procs import GatewayProcess
from tests.redis_server import RedisServer
from tests.upstreams import make_echo_app

BURST = 20
ROUTES = """version: 1
store: {{redis: "{url}", timeout: 500ms, on_store_error: deny}}
services:
  echo: {{targets: [{echo}]}}
routes:
  - prefix: /limited-{ns}
    service: echo
    rate_limit: {{limit: 1, per: 1h, burst: {burst}}}
"""


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_echo_app())


def write_routes(tmp_path: Path, redis: RedisServer, echo: TestServer) -> Path:
    path = tmp_path / "routes.yaml"
    base = str(echo.make_url("")).rstrip("/")
    text = ROUTES.format(url=redis.url, echo=base, ns=redis.namespace, burst=BURST)
    path.write_text(text)
    return path


async def burst_statuses(urls: list[str]) -> list[int]:
    """2 x BURST requests at once, spread over `urls`, each on its own connection (so the
    kernel spreads them over a supervisor's workers too)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(url: str) -> int:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status

        return sorted(await asyncio.gather(*(one(urls[i % len(urls)]) for i in range(2 * BURST))))


async def test_two_workers_sharing_redis_admit_exactly_burst(
    tmp_path: Path, redis: RedisServer, echo: TestServer
) -> None:
    config = write_routes(tmp_path, redis, echo)
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        statuses = await burst_statuses([f"{gateway.url}/limited-{redis.namespace}/x"])
    finally:
        await gateway.stop()
    assert statuses == [200] * BURST + [429] * BURST, gateway.output()[-2000:]


async def test_two_gateway_processes_on_two_ports_sharing_redis_admit_exactly_burst(
    tmp_path: Path, redis: RedisServer, echo: TestServer
) -> None:
    config = write_routes(tmp_path, redis, echo)
    first, second = await asyncio.gather(GatewayProcess.start(config), GatewayProcess.start(config))
    try:
        path = f"/limited-{redis.namespace}/x"
        statuses = await burst_statuses([first.url + path, second.url + path])
    finally:
        await asyncio.gather(first.stop(), second.stop())
    assert statuses == [200] * BURST + [429] * BURST
