"""What the gateway answers itself when upstreams fail: problem+json, the right status, no
internal address, and a broken body (never a clean short one) after the response started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.runtime.state import GATEWAY
from tests.gateway.conftest import ECHO_ROUTE, MakeGateway
from tests.polling import eventually, free_port
from tests.upstreams import make_gated_app

PROBLEM_KEYS = {"type", "title", "status", "detail", "request_id"}


async def problem(resp: aiohttp.ClientResponse) -> dict[str, object]:
    assert resp.content_type == "application/problem+json"
    body: dict[str, object] = await resp.json(content_type=None)
    assert set(body) == PROBLEM_KEYS
    assert "127.0.0.1" not in str(body)
    assert "Traceback" not in str(body)
    return body


async def test_refused_connection_is_a_502_problem(make_gateway: MakeGateway) -> None:
    port = free_port()
    routes = f"version: 1\nservices:\n  gone: {{targets: [http://127.0.0.1:{port}]}}\n"
    client = await make_gateway(routes + "routes:\n  - {prefix: /, service: gone}\n")

    resp = await client.get("/x")

    assert resp.status == 502
    assert (await problem(resp))[
        "detail"
    ] == "service 'gone' failed: connection refused or unreachable"


async def test_upstream_reset_is_a_502_problem(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/tools/reset")

    assert resp.status == 502
    await problem(resp)


async def test_upstream_slower_than_the_read_timeout_is_a_504_problem(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)  # tools: read 1s; /slow takes 5 s
    loop = asyncio.get_running_loop()
    started = loop.time()

    resp = await client.get("/tools/slow")

    assert resp.status == 504
    assert (await problem(resp))["title"] == "Gateway Timeout"
    assert loop.time() - started < 4


async def test_upstream_that_breaks_mid_body_gives_a_broken_body(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/tools/broken")

    assert resp.status == 200  # headers were already sent
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_gateway_stays_usable_after_a_broken_response(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)
    with pytest.raises(aiohttp.ClientPayloadError):
        await (await client.get("/tools/broken")).read()

    resp = await client.get("/echo/after")

    assert resp.status == 200


def make_drip_app(finished: asyncio.Event) -> web.Application:
    """Sends a chunk every 20 ms for 10 s; `finished` is set when the handler stops."""

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        try:
            await response.prepare(request)
            for _ in range(500):
                await response.write(b"d" * 1024)
                await asyncio.sleep(0.02)
            await response.write_eof()
            return response
        finally:
            finished.set()

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_get("/drip", drip)
    return app


async def test_client_disconnect_cancels_the_upstream_request(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    finished = asyncio.Event()
    drip = await aiohttp_server(make_drip_app(finished))
    routes = "version: 1\nservices:\n  drip: {targets: [$DRIP]}\n"
    routes += "routes:\n  - {prefix: /, service: drip}\n"
    client = await make_gateway(routes, drip=drip)

    resp = await client.get("/drip")
    await resp.content.readexactly(1024)
    resp.close()  # the client goes away mid-download

    await asyncio.wait_for(finished.wait(), timeout=3)  # long before the 10 s stream ends


def make_counting_app(seen: list[int]) -> web.Application:
    """Records how many body bytes each request delivered before it ended (or broke)."""

    async def sink(request: web.Request) -> web.Response:
        received = 0
        try:
            async for chunk in request.content.iter_any():
                received += len(chunk)
        finally:
            seen.append(received)
        return web.json_response({"received": received})

    app = web.Application()
    app.router.add_post("/sink", sink)
    return app


LIMITED = """
version: 1
limits: {max_body_bytes: 100000}
services:
  sink: {targets: [$SINK]}
routes:
  - {prefix: /small, service: sink, strip_prefix: true, max_body_bytes: 1000}
  - {prefix: /big, service: sink, strip_prefix: true}
"""


async def test_content_length_over_the_route_limit_is_413_before_the_upstream(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    client = await make_gateway(LIMITED, sink=await aiohttp_server(make_counting_app(seen)))

    resp = await client.post("/small/sink", data=b"x" * 1001)

    assert resp.status == 413
    assert (await problem(resp))["status"] == 413
    assert seen == []


async def test_global_limit_applies_where_the_route_sets_none(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    client = await make_gateway(LIMITED, sink=await aiohttp_server(make_counting_app(seen)))

    under = await client.post("/big/sink", data=b"x" * 100_000)
    over = await client.post("/big/sink", data=b"x" * 100_001)

    assert (under.status, over.status) == (200, 413)
    assert seen == [100_000]


async def test_chunked_body_is_cut_off_once_it_passes_the_limit(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    client = await make_gateway(LIMITED, sink=await aiohttp_server(make_counting_app(seen)))

    async def body() -> AsyncIterator[bytes]:
        yield b"y" * 512
        await asyncio.sleep(0.3)  # the upstream has the request and its first bytes
        for _ in range(99):
            yield b"y" * 512

    resp = await client.post("/small/sink", data=body())

    assert resp.status == 413
    await problem(resp)
    await eventually(lambda: bool(seen), within=3)  # the upstream request ends, broken
    assert 512 <= seen[0] <= 1000  # it got what was under the limit, never the whole body


async def test_a_stalled_upload_is_cut_off_with_408_and_the_target_is_not_blamed(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    routes = (
        "version: 1\nservices:\n  sink:\n    targets: [$SINK]\n"
        "    circuit_breaker: {failures: 1}\n    timeouts: {read: 300ms}\n"
        "routes:\n  - {prefix: /, service: sink}\n"
    )
    client = await make_gateway(routes, sink=await aiohttp_server(make_counting_app(seen)))
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"z" * 100
        await release.wait()  # the client goes quiet mid-body
        yield b"z" * 100

    started = asyncio.get_running_loop().time()
    resp = await client.post("/sink", data=stalled())
    release.set()

    assert resp.status == 408
    assert (await problem(resp))["title"] == "Request Timeout"
    assert asyncio.get_running_loop().time() - started < 3
    after = await client.post("/sink", data=b"ok")  # one failure would have opened the circuit
    assert after.status == 200


async def _first_status_line(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout=3)
    finally:
        writer.close()


async def test_expect_100_continue_is_refused_with_413_when_the_body_is_too_large(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    seen: list[int] = []
    client = await make_gateway(LIMITED, sink=await aiohttp_server(make_counting_app(seen)))
    head = "POST /small/sink HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    assert client.port is not None

    too_large = await _first_status_line(
        client.port, (head + "Content-Length: 5000\r\n\r\n").encode()
    )
    small = await _first_status_line(client.port, (head + "Content-Length: 10\r\n\r\n").encode())

    assert too_large.startswith(b"HTTP/1.1 413")
    assert small == b"HTTP/1.1 100 Continue\r\n"
    assert seen == []


async def test_a_full_pool_is_a_503_and_does_not_open_the_targets_circuit(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    gate = asyncio.Event()
    routes = (
        "version: 1\nservices:\n  held:\n    targets: [$HELD]\n    max_connections: 1\n"
        "    timeouts: {connect: 200ms}\n    circuit_breaker: {failures: 1}\n"
        "routes:\n  - {prefix: /, service: held}\n"
    )
    client = await make_gateway(routes, held=await aiohttp_server(make_gated_app(gate)))
    first = asyncio.create_task(client.get("/one"))  # takes the only connection and waits
    held = client.app[GATEWAY].services["held"].targets[0]
    await eventually(lambda: held.in_flight == 1, within=3)  # the first request has left

    crowded = await client.get("/two")
    gate.set()

    assert crowded.status == 503
    assert crowded.headers["Retry-After"] == "1"
    assert (await problem(crowded))["title"] == "Service Unavailable"
    assert (await first).status == 200
    assert (await client.get("/three")).status == 200  # the circuit stayed closed
