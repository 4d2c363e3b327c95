"""The watch on request bodies through the gateway: a client that goes silent or trickles
below `limits.min_body_rate` gets a 408, an upstream that is slow to read never makes the
client's upload a 408, and a 408 is answered without an "Unhandled exception" in the log."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator

import pytest
from pytest_aiohttp import AiohttpServer

from gateway.config.build import load_text
from tests.gateway.conftest import MakeGateway
from tests.gateway.test_errors import make_counting_app
from tests.upstreams import make_late_reader_app

SINK = (
    "version: 1\n{limits}services:\n  sink:\n    targets: [$SINK]\n"
    "    circuit_breaker: {{failures: 1}}\n    timeouts: {{read: 300ms}}\n"
    "routes:\n  - {{prefix: /, service: sink}}\n"
)


async def trickle(chunk: bytes, every: float, seconds: float) -> AsyncIterator[bytes]:
    """`chunk` every `every` seconds for `seconds` (a chunked body)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        yield chunk
        await asyncio.sleep(every)


def test_min_body_rate_defaults_to_500_bytes_a_second_and_drain_timeout_to_10_minutes() -> None:
    text = SINK.format(limits="").replace("$SINK", "http://127.0.0.1:1")
    config = load_text(text, "routes.yaml", environ={}).config
    tuned = load_text(
        SINK.format(limits="limits: {min_body_rate: 0, drain_timeout: 1m}\n").replace(
            "$SINK", "http://127.0.0.1:1"
        ),
        "routes.yaml",
        environ={},
    ).config

    assert config is not None
    assert tuned is not None
    assert (config.routes[0].min_body_rate, config.drain_timeout) == (500, 600.0)
    assert (tuned.routes[0].min_body_rate, tuned.drain_timeout) == (0, 60.0)


async def test_an_upload_to_an_upstream_slow_to_read_is_not_a_408(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    # The upstream reads nothing for 1.5 s, five times the route's read timeout: the client's
    # bytes stall in the gateway's buffers, through no fault of the client.
    client = await make_gateway(
        SINK.format(limits=""), sink=await aiohttp_server(make_late_reader_app(1.5))
    )
    size = 32 * 2**20  # more than every socket buffer on the way holds

    async with client.post("/upload", data=io.BytesIO(b"u" * size)) as response:
        answer = await response.json()

    assert response.status == 200
    assert answer == {"received": size}


async def test_a_408_logs_no_unhandled_exception(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[int] = []
    client = await make_gateway(
        SINK.format(limits=""), sink=await aiohttp_server(make_counting_app(seen))
    )
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"z" * 100
        await release.wait()
        yield b"z" * 100

    async with client.post("/sink", data=stalled()) as response:
        await response.read()
    release.set()
    await client.post("/sink", data=b"after")  # the next request: logs of the last are out

    assert response.status == 408
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_body_trickling_below_min_body_rate_is_cut_off_with_408(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    routes = SINK.format(limits="limits: {min_body_rate: 1000}\n")
    client = await make_gateway(routes, sink=await aiohttp_server(make_counting_app(seen)))
    started = time.monotonic()

    # 10 bytes every 50 ms: 200 bytes/s, never silent for a read timeout, yet far too slow.
    async with client.post("/sink", data=trickle(b"t" * 10, 0.05, 5.0)) as response:
        problem = await response.json(content_type="application/problem+json")

    assert response.status == 408
    assert "slower than 1000 bytes/s" in problem["detail"]
    assert time.monotonic() - started < 2.0  # within a few 300 ms intervals, not 5 s
    assert (await client.post("/sink", data=b"ok")).status == 200  # the target is not blamed


async def test_a_body_above_min_body_rate_goes_through(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    routes = SINK.format(limits="limits: {min_body_rate: 1000}\n")
    client = await make_gateway(routes, sink=await aiohttp_server(make_counting_app(seen)))

    # 200 bytes every 50 ms: 4000 bytes/s, for longer than a few intervals.
    async with client.post("/sink", data=trickle(b"f" * 200, 0.05, 1.0)) as response:
        answer = await response.json()

    assert response.status == 200
    assert answer["received"] == seen[0] >= 200 * 15
