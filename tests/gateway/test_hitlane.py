"""The hit lane (gateway/servers/hitlane.py) through a real gateway on loopback: which requests
it answers, that pipelined requests keep their order across it and aiohttp's loop, that the
connection is kept or closed as aiohttp would, that its hits are logged and counted like the
others, that a route with auth or a rate limit never uses it, that a reload turns it off and
on, that more pipelined hits than aiohttp queues are all answered, and that the keep-alive and
header timeouts still close a connection it answered on. Its bytes are
compared with aiohttp's loop's in test_cache_wire.py."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.servers.admin import create_admin_app
from gateway.servers.connection import GatewayProtocol
from tests.cache_upstream import CountingUpstream
from tests.gateway.conftest import GatewayTestServer, compile_gateway
from tests.gateway.test_accesslog import Lines
from tests.gateway.test_cache_wire import (
    CLOSE,
    Answer,
    access_lines,  # noqa: F401 (a fixture)
    assert_three_hits_and_a_head,
    blanked,
    closing,
    get,
    lane_of,
    lane_off,
    metrics_text,
    miss,
    read_answer,
    talk,
)

KEY = "k-lane-5d1e"
ROUTES = f"""
version: 1
store: {{cache_dir: "$DIR"}}
limits: {{keepalive_timeout: 500ms}}
auth:
  api_keys:
    - {{consumer: panel, key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}
services:
  up: {{targets: [$UP]}}
routes:
  - {{prefix: /c, service: up, cache: {{ttl: 60s}}}}
  - {{prefix: /limited, service: up, cache: {{ttl: 60s}}, rate_limit: {{limit: 2, per: 1h}}}}
  - {{prefix: /keyed, service: up, cache: {{ttl: 60s}}, auth: {{any_of: [api_key]}}}}
"""

Start = Callable[..., Awaitable[GatewayTestServer]]
Render = Callable[[str], str]


@pytest.fixture
def upstream() -> CountingUpstream:
    return CountingUpstream()


@pytest.fixture
async def render(
    aiohttp_server: AiohttpServer, upstream: CountingUpstream, tmp_path: Path
) -> Render:
    """Routes text with the upstream's URL and the cache directory in it."""
    up = await aiohttp_server(upstream.app())
    url = str(up.make_url("")).rstrip("/")
    return lambda routes: routes.replace("$DIR", str(tmp_path / "c")).replace("$UP", url)


@pytest.fixture
async def serve(render: Render) -> AsyncIterator[Start]:
    """`await serve(routes=ROUTES)` -> a started gateway in front of `upstream`."""
    servers: list[GatewayTestServer] = []

    async def start(routes: str = ROUTES) -> GatewayTestServer:
        server = GatewayTestServer(compile_gateway(render(routes)))
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def port(server: GatewayTestServer) -> int:
    assert server.port is not None
    return server.port


async def warm(server: GatewayTestServer, *paths: str) -> None:
    """Each path asked once (the miss that stores it), on a connection of its own, until its
    entry is in the hot map."""
    for path in paths:
        answer = await miss(server, get(path, CLOSE))
        assert answer.headers["x-cache"] == "MISS"


async def test_hits_one_after_another_on_a_connection_are_answered_in_the_lane(
    serve: Start, upstream: CountingUpstream
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/a")
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    try:
        bodies = []
        for method in ("GET", "HEAD", "GET"):
            writer.write(get("/c/a", method=method))
            answer = await read_answer(reader, method)
            assert (answer.status, answer.headers["x-cache"]) == (200, "HIT")
            bodies.append(answer.body)
        # A miss goes to aiohttp's loop; the hit asked right after its answer is the lane's.
        writer.write(get("/c/b"))
        assert (await read_answer(reader)).headers["x-cache"] == "MISS"
        before = lane.answered
        writer.write(get("/c/b"))
        assert (await read_answer(reader)).headers["x-cache"] == "HIT"
        assert lane.answered == before + 1
    finally:
        writer.close()
    assert bodies[0] == bodies[2] != b"" == bodies[1]
    assert lane.answered == 4
    assert (upstream.count("/c/a"), upstream.count("/c/b")) == (1, 1)


async def test_pipelined_lane_hits_and_other_requests_keep_their_order(
    serve: Start, upstream: CountingUpstream
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/p1?etag=v1", "/c/p2")
    data = (
        get("/c/p1?etag=v1")  # the lane's
        + get("/c/p2")  # the lane's
        + get("/c/new")  # a miss: aiohttp's loop from here on, in order
        + get("/c/p1?etag=v1", 'If-None-Match: "v1"')  # a 304
        + get("/c/p2", method="HEAD")
        + get("/c/missing", method="POST")  # not cached: a write goes upstream
        + get("/c/p1?etag=v1", CLOSE)
    )
    methods = ["GET", "GET", "GET", "GET", "HEAD", "POST", "GET"]
    answers, rest = await talk(port(server), data, methods)

    assert [(a.status, a.headers["x-cache"]) for a in answers] == [
        (200, "HIT"), (200, "HIT"), (200, "MISS"), (304, "HIT"), (200, "HIT"), (200, "BYPASS"),
        (200, "HIT"),
    ]  # fmt: skip
    paths = [b'"/c/p1?etag=v1"', b'"/c/p2"', b'"/c/new"', None, None, b'"/c/missing"']
    for answer, path in zip(answers, paths, strict=False):
        assert path is None or path in answer.body
    assert answers[6].body == answers[0].body
    assert rest == b""
    assert lane.answered == 2  # the first two; then aiohttp's loop had a request queued
    assert len({a.headers["x-request-id"] for a in answers}) == 7


async def test_http_1_0_and_connection_close_end_the_connection_as_aiohttp_does(
    serve: Start,
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/v")
    cases: list[tuple[bytes, list[str]]] = [
        (get("/c/v", version="1.0"), ["GET"]),  # 1.0 without keep-alive: closed after it
        (get("/c/v", "Connection: keep-alive", version="1.0") + get("/c/v", CLOSE), ["GET"] * 2),
        (get("/c/v", CLOSE), ["GET"]),
        (get("/c/v", method="HEAD", version="1.0"), ["HEAD"]),
        # Bytes after a request that closes: aiohttp's parser refuses them (400), either way.
        (get("/c/v", CLOSE) + get("/c/v"), ["GET"]),
    ]
    seen: dict[str, list[list[bytes]]] = {}
    for way in ("lane", "loop"):
        if way == "loop":
            lane_off(server)
        for data, methods in cases:
            answers, rest = await talk(port(server), data, methods)
            assert rest == b""  # closed after the answers, nothing more sent
            # A problem's body names its request id too.
            same = [re.sub(rb'"request_id": "\w+"', b"-", blanked(a)) for a in answers]
            seen.setdefault(way, []).append(same)
        if way == "lane":
            assert lane.answered == 5
    assert seen["lane"] == seen["loop"]
    assert lane.answered == 5
    lines = [answer.split(b"\r\n")[0] for case in seen["lane"] for answer in case]
    assert lines == [
        b"HTTP/1.0 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK",
        b"HTTP/1.0 200 OK", b"HTTP/1.1 400 Bad Request",
    ]  # fmt: skip
    assert b"\r\nConnection: keep-alive\r\n" in seen["lane"][1][0]
    assert b"\r\nConnection: close\r\n" in seen["lane"][1][1]


async def test_lane_hits_are_logged_and_counted_like_the_loops(
    serve: Start,
    aiohttp_client: AiohttpClient,
    access_lines: Lines,  # noqa: F811
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/l")
    [in_lane, head], _ = await talk(
        port(server), get("/c/l", "X-Request-ID: mine-1") + get("/c/l", CLOSE, method="HEAD"),
        ["GET", "HEAD"],
    )  # fmt: skip
    assert lane.answered == 2
    lane_off(server)
    [in_loop], _ = await talk(port(server), get("/c/l", "X-Request-ID: mine-2", CLOSE), ["GET"])
    lines = await access_lines.wait_for(4)

    assert in_lane.headers["x-request-id"] == "mine-1"
    assert in_loop.headers["x-request-id"] == "mine-2"
    _miss, lane_get, lane_head, loop_get = lines
    assert (lane_get["request_id"], loop_get["request_id"]) == ("mine-1", "mine-2")
    assert lane_head["request_id"] == head.headers["x-request-id"]
    per_request = {"time", "request_id", "trace_id", "total_ms"}

    def same(line: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in line.items() if k not in per_request}

    assert same(lane_get) == same(loop_get)
    assert same(lane_head) == {**same(loop_get), "method": "HEAD"}
    assert (lane_get["bytes_out"], lane_get["cache"]) == (len(in_lane.body), "HIT")
    assert isinstance(lane_get["total_ms"], float)

    assert_three_hits_and_a_head(await metrics_text(aiohttp_client, server.gateway))
    admin = await aiohttp_client(create_admin_app(server.gateway))
    async with admin.get("/stats") as resp:
        stats = await resp.json()
    assert "routes.0" in str(stats)


async def test_a_route_with_auth_or_a_rate_limit_before_its_cache_never_uses_the_lane(
    serve: Start, upstream: CountingUpstream
) -> None:
    server = await serve()
    lane = lane_of(server)
    keyed = f"X-API-Key: {KEY}"
    [miss], _ = await talk(port(server), get("/keyed/a", keyed, CLOSE), ["GET"])
    await warm(server, "/limited/a")
    assert miss.headers["x-cache"] == "MISS"
    data = get("/keyed/a", keyed) + get("/keyed/a") + get("/limited/a") + get("/limited/a", CLOSE)
    answers, _ = await talk(port(server), data, ["GET"] * 4)

    assert [(a.status, a.headers.get("x-cache")) for a in answers] == [
        (200, "HIT"),
        (401, None),
        (200, "HIT"),
        (429, None),
    ]  # fmt: skip  (auth ran before the cache; the limit of 3 counted every request)
    assert "ratelimit-remaining" in answers[2].headers
    assert lane.answered == 0
    assert (upstream.count("/keyed/a"), upstream.count("/limited/a")) == (1, 1)


async def test_a_reload_turns_the_lane_off_and_on_with_the_route(
    serve: Start, render: Render
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/r")
    gateway = server.gateway

    async def hit(expected_lane: int) -> Answer:
        [answer], _ = await talk(port(server), get("/c/r", CLOSE), ["GET"])
        assert answer.headers["x-cache"] == "HIT"
        assert lane.answered == expected_lane
        return answer

    await hit(1)
    cached = "{prefix: /c, service: up, cache: {ttl: 60s}"
    limited = ROUTES.replace(cached, cached + ", rate_limit: {limit: 100, per: 1h}")
    assert limited != ROUTES
    for text, answered in ((limited, 1), (ROUTES, 2)):
        assert gateway.apply(load_text(render(text), "routes.yaml", environ={}))
        answer = await hit(answered)
        assert ("ratelimit-remaining" in answer.headers) == (text is limited)


async def test_the_keepalive_timeout_still_closes_a_connection_after_lane_answers(
    serve: Start,
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/k")
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    try:
        writer.write(get("/c/k") + get("/c/k", method="HEAD"))
        await read_answer(reader)
        await read_answer(reader, "HEAD")
        assert lane.answered == 2
        started = time.monotonic()
        assert await closing(reader) == b""  # keep-alive, then nothing: closed at 0.5 s
        assert 0.4 <= time.monotonic() - started < 3.0
    finally:
        writer.close()


async def test_tracing_leaves_every_hit_to_aiohttps_loop(serve: Start) -> None:
    traced = ROUTES.replace(
        "services:", 'tracing: {otlp_endpoint: "http://127.0.0.1:9", sample_ratio: 0.0}\nservices:'
    )
    server = await serve(traced)
    await warm(server, "/c/t")
    [hit], _ = await talk(port(server), get("/c/t", CLOSE), ["GET"])
    assert hit.headers["x-cache"] == "HIT"
    assert lane_of(server).answered == 0


async def test_more_pipelined_hits_than_aiohttp_queues_are_all_answered_in_order(
    serve: Start,
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/q1", "/c/q2")
    count = 80  # aiohttp's parser holds back what is past 32 queued requests
    paths = [f"/c/q{1 + i % 2}" for i in range(count)]
    data = b"".join(get(path) for path in paths[:-1]) + get(paths[-1], CLOSE)
    answers, rest = await talk(port(server), data, ["GET"] * count)

    assert rest == b""
    assert all(a.headers["x-cache"] == "HIT" for a in answers)
    assert [f'"{path}"'.encode() in a.body for a, path in zip(answers, paths, strict=True)] == [
        True
    ] * count
    assert lane.answered == count


@pytest.mark.parametrize(
    "line",
    ["Authorization: Bearer x.y.z", "Cookie: session=1", "Cache-Control: no-cache"],
)
async def test_requests_the_cache_must_not_answer_from_memory_skip_the_lane(
    serve: Start, upstream: CountingUpstream, line: str
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/b")
    before = upstream.count("/c/b")

    [answer], _ = await talk(port(server), get("/c/b", line, CLOSE), ["GET"])

    assert answer.status == 200
    assert answer.headers["x-cache"] != "HIT"
    assert lane.answered == 0
    assert upstream.count("/c/b") == before + 1  # it went upstream, as the contract says


async def test_a_pipelined_flood_is_answered_a_queue_at_a_time_across_loop_turns(
    serve: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await serve()
    lane = lane_of(server)
    await warm(server, "/c/f1", "/c/f2")
    per_call: list[int] = []
    serve_lane = GatewayProtocol._serve_lane

    def counted(self: GatewayProtocol) -> None:  # the real one, each call's answers noted
        before = lane.answered
        serve_lane(self)
        per_call.append(lane.answered - before)

    monkeypatch.setattr(GatewayProtocol, "_serve_lane", counted)
    count = 400  # one write: aiohttp's parser queues 32 and holds back the rest
    paths = [f"/c/f{1 + i % 2}" for i in range(count)]
    data = b"".join(get(path) for path in paths[:-1]) + get(paths[-1], CLOSE)
    answers, rest = await talk(port(server), data, ["GET"] * count)

    assert rest == b""
    assert [f'"{path}"'.encode() in a.body for a, path in zip(answers, paths, strict=True)] == [
        True
    ] * count
    assert lane.answered == count  # all in the lane, in order
    # No loop callback answers more than a queue's worth: other connections run between.
    assert max(per_call) <= MAX_MSG_QUEUE_SIZE < count
    assert sum(per_call) == count


async def test_a_head_that_stalls_after_lane_answers_meets_the_header_timeout(
    serve: Start,
) -> None:
    limits = "limits: {keepalive_timeout: 10s, header_timeout: 300ms}"
    server = await serve(ROUTES.replace("limits: {keepalive_timeout: 500ms}", limits))
    lane = lane_of(server)
    await warm(server, "/c/s")
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
    try:
        writer.write(get("/c/s"))
        assert (await read_answer(reader)).headers["x-cache"] == "HIT"
        assert lane.answered == 1
        writer.write(b"GET /c/s HTTP/1.1\r\nHost: gw\r\n")  # a head that never ends
        started = time.monotonic()
        assert await closing(reader) == b""
        assert 0.25 <= time.monotonic() - started < 3.0
    finally:
        writer.close()
    assert b'reason="header_timeout"' in server.gateway.metrics.render()
