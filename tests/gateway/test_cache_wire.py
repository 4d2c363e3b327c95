"""A cache hit on the wire, through a real gateway and a real upstream, read off a raw socket:
the bytes of a HIT are a well-formed HTTP/1.1 answer carrying the MISS's headers, a HEAD hit
has no body, a conditional hit is a 304, pipelined requests are all answered in order,
HTTP/1.0 clients and `Connection: close` are honoured as aiohttp honours them, and the access
line, the metrics and the trace still record every hit, and a hit the lane answers from the
connection (gateway/servers/hitlane.py) is byte for byte the one aiohttp's loop sends. (Hits
are answered through gateway/http/whole.py: test_whole.py holds it to aiohttp's own
`web.Response`.)"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.ops.accesslog import access_logger
from gateway.runtime.state import Gateway
from gateway.servers.admin import create_admin_app
from gateway.servers.connection import GatewayServer
from gateway.servers.hitlane import HitLane
from tests.cache_upstream import CountingUpstream
from tests.gateway.conftest import GatewayTestServer, compile_gateway
from tests.gateway.test_accesslog import Lines
from tests.gateway.test_h1client import Upstream, answering
from tests.gateway.test_tracing import Collector, collector, flush  # noqa: F401 (a fixture)
from tests.polling import eventually

ROUTES = """
version: 1
store: {{cache_dir: "{dir}"}}
{tracing}
services:
  up: {{targets: [$UP]}}
routes:
  - {{prefix: /c, service: up, cache: {{ttl: 60s}}}}
"""
PER_ANSWER = frozenset({"age", "date", "x-request-id", "x-cache"})  # values differ per answer


@pytest.fixture
def upstream() -> CountingUpstream:
    return CountingUpstream()


Start = Callable[..., Awaitable[tuple[int, GatewayTestServer]]]


@pytest.fixture
async def serve(
    aiohttp_server: AiohttpServer, upstream: CountingUpstream, tmp_path: Path
) -> AsyncIterator[Start]:
    """`await serve(tracing="")` -> (port, server) of a gateway in front of `upstream`."""
    servers: list[GatewayTestServer] = []

    async def start(tracing: str = "") -> tuple[int, GatewayTestServer]:
        up = await aiohttp_server(upstream.app())
        text = ROUTES.format(dir=tmp_path / "cache", tracing=tracing)
        server = GatewayTestServer(compile_gateway(text, up=up))
        await server.start_server()
        servers.append(server)
        assert server.port is not None
        return server.port, server

    yield start
    for server in servers:
        await server.close()


class Answer:
    """One response read off the wire by its own framing."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.raw = head + body
        line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        self.line = line
        self.pairs = [tuple(x.split(": ", 1)) for x in lines]
        self.headers = {name.lower(): value for name, value in self.pairs}
        self.body = body

    @property
    def status(self) -> int:
        return int(self.line.split(" ", 2)[1])


async def read_answer(reader: asyncio.StreamReader, method: str = "GET") -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    status = int(head.split(b" ", 2)[1])
    bodiless = method == "HEAD" or status in (204, 304)
    size = 0 if bodiless or length is None else int(length[1])
    return Answer(head, await asyncio.wait_for(reader.readexactly(size), 5))


async def talk(port: int, data: bytes, methods: list[str]) -> tuple[list[Answer], bytes]:
    """Send `data`, read one answer per method, then whatever else comes until the server
    closes or 0.5 s passes without a byte (only asked when the connection should be kept)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answers = [await read_answer(reader, m) for m in methods]
        return answers, await closing(reader)
    finally:
        writer.close()


async def closing(reader: asyncio.StreamReader) -> bytes:
    """What the server sends after the answers read: b"" when it closes (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


def get(path: str, *lines: str, method: str = "GET", version: str = "1.1") -> bytes:
    extra = "".join(f"{line}\r\n" for line in lines)
    return f"{method} {path} HTTP/{version}\r\nHost: gw\r\n{extra}\r\n".encode()


CLOSE = "Connection: close"
# HTTP version, Connection header, whether the connection stays open after the answer.
KEEP_ALIVE_CASES: Final = [
    ("1.1", "", True),
    ("1.1", CLOSE, False),
    ("1.0", "", False),
    ("1.0", "Connection: keep-alive", True),
]


async def test_a_hit_is_well_formed_and_carries_the_misss_headers(
    serve: Start, upstream: CountingUpstream
) -> None:
    port, _ = await serve()
    [miss], _ = await talk(port, get("/c/a?etag=v1", CLOSE), ["GET"])
    [hit], _ = await talk(port, get("/c/a?etag=v1", CLOSE), ["GET"])

    assert miss.line == hit.line == "HTTP/1.1 200 OK"
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert hit.body == miss.body
    assert hit.headers["content-length"] == str(len(hit.body))
    assert int(hit.headers["age"]) >= 0
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", hit.headers["date"])
    assert len(hit.pairs) == len(hit.headers)  # no header twice
    assert all(re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", n) for n, _ in hit.pairs)
    # The same header set, the per-answer values aside. The upstream's Server line is not
    # replayed on a hit (apply_exchange drops it unless the answer came from upstream).
    assert set(hit.headers) == set(miss.headers) - {"server"} | {"age"}
    for name in set(hit.headers) - PER_ANSWER:
        assert hit.headers[name] == miss.headers[name], name
    assert upstream.count("/c/a?etag=v1") == 1


async def test_a_head_hit_has_the_length_and_no_body_and_the_connection_goes_on(
    serve: Start, upstream: CountingUpstream
) -> None:
    port, _ = await serve()
    [miss], _ = await talk(port, get("/c/h", CLOSE), ["GET"])
    # HEAD then GET on one connection: a stray body after the HEAD would be read as the
    # GET's answer and fail its framing.
    data = get("/c/h", method="HEAD") + get("/c/h", CLOSE)
    [head, after], rest = await talk(port, data, ["HEAD", "GET"])

    assert (head.status, head.headers["x-cache"], head.body) == (200, "HIT", b"")
    assert head.headers["content-length"] == str(len(miss.body))
    assert (after.status, after.headers["x-cache"], after.body) == (200, "HIT", miss.body)
    assert rest == b""
    assert upstream.count("/c/h", "HEAD") == 0


async def test_a_conditional_hit_is_a_304_without_a_body(
    serve: Start, upstream: CountingUpstream
) -> None:
    port, _ = await serve()
    await talk(port, get("/c/t?etag=v1", CLOSE), ["GET"])
    data = get("/c/t?etag=v1", 'If-None-Match: "v1"') + get("/c/t?etag=v1", CLOSE)
    [not_modified, full], rest = await talk(port, data, ["GET", "GET"])

    assert not_modified.line == "HTTP/1.1 304 Not Modified"
    assert (not_modified.headers["x-cache"], not_modified.headers["etag"]) == ("HIT", '"v1"')
    assert "age" in not_modified.headers
    assert "content-length" not in not_modified.headers
    assert not_modified.body == b""
    assert (full.status, full.headers["x-cache"]) == (200, "HIT")
    assert rest == b""


async def test_pipelined_requests_are_all_answered_in_order(
    serve: Start, upstream: CountingUpstream
) -> None:
    port, _ = await serve()
    for path in ("/c/p1", "/c/p2"):
        await talk(port, get(path, CLOSE), ["GET"])
    data = get("/c/p1") + get("/c/p2") + get("/c/p1", method="HEAD") + get("/c/p2", CLOSE)
    answers, rest = await talk(port, data, ["GET", "GET", "HEAD", "GET"])

    assert [a.headers["x-cache"] for a in answers] == ["HIT"] * 4
    assert [b'"/c/p1"' in a.body for a in answers] == [True, False, False, False]
    assert b'"/c/p2"' in answers[1].body
    assert answers[3].body == answers[1].body
    assert len({a.headers["x-request-id"] for a in answers}) == 4
    assert rest == b""
    assert (upstream.count("/c/p1"), upstream.count("/c/p2")) == (1, 1)


async def test_http_1_0_and_connection_close_are_honoured_on_a_hit(
    serve: Start, upstream: CountingUpstream
) -> None:
    port, _ = await serve()
    await talk(port, get("/c/v", CLOSE), ["GET"])

    [plain], rest = await talk(port, get("/c/v", version="1.0"), ["GET"])
    assert plain.line == "HTTP/1.0 200 OK"  # aiohttp answers in the request's version
    assert (plain.headers["x-cache"], "connection" in plain.headers) == ("HIT", False)
    assert rest == b""  # HTTP/1.0 without keep-alive: closed after the answer

    kept = get("/c/v", "Connection: keep-alive", version="1.0") + get("/c/v", CLOSE)
    [first, second], rest = await talk(port, kept, ["GET", "GET"])
    assert first.line == "HTTP/1.0 200 OK"
    assert first.headers["connection"] == "keep-alive"
    assert (second.line, second.headers["connection"]) == ("HTTP/1.1 200 OK", "close")
    assert rest == b""

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(get("/c/v", CLOSE))
        closed = await read_answer(reader)
        assert (closed.headers["x-cache"], closed.headers["connection"]) == ("HIT", "close")
        assert await closing(reader) == b""  # the server closed: nothing more, EOF
    finally:
        writer.close()


async def metrics_text(aiohttp_client: AiohttpClient, gateway: Gateway) -> str:
    admin = await aiohttp_client(create_admin_app(gateway))
    async with admin.get("/metrics") as resp:
        return await resp.text()


def assert_three_hits_and_a_head(text: str) -> None:
    """/metrics counted three cache hits of routes.0, answered to 3 GETs and a HEAD (2xx)."""
    assert 'gateway_cache_lookups_total{result="hit",route="routes.0"} 3.0' in text
    for method, count in (("GET", 3), ("HEAD", 1)):
        labels = f'method="{method}",route="routes.0",status_class="2xx"'
        assert f"gateway_requests_total{{{labels}}} {count}.0" in text


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    lines = Lines()
    level = access_logger.level
    access_logger.setLevel("INFO")
    access_logger.addHandler(lines)
    try:
        yield lines
    finally:
        access_logger.removeHandler(lines)
        access_logger.setLevel(level)


async def test_the_access_line_and_the_metrics_record_every_hit(
    serve: Start, aiohttp_client: AiohttpClient, access_lines: Lines
) -> None:
    port, server = await serve()
    data = get("/c/l") + get("/c/l") + get("/c/l", method="HEAD") + get("/c/l", CLOSE)
    [miss, hit, head, _], _ = await talk(port, data, ["GET", "GET", "HEAD", "GET"])
    lines = await access_lines.wait_for(4)

    assert [(x["method"], x["status"], x["cache"]) for x in lines] == [
        ("GET", 200, "MISS"), ("GET", 200, "HIT"), ("HEAD", 200, "HIT"), ("GET", 200, "HIT"),
    ]  # fmt: skip
    assert lines[1]["request_id"] == hit.headers["x-request-id"]
    assert lines[1]["bytes_out"] == len(hit.body) == len(miss.body)
    assert lines[2]["request_id"] == head.headers["x-request-id"]
    assert (lines[1]["upstream_ms"], lines[1]["calls"]) == (None, [])  # nothing went up
    text = await metrics_text(aiohttp_client, server.gateway)
    assert_three_hits_and_a_head(text)


async def test_a_hit_is_traced_as_a_server_span_without_upstream_calls(
    serve: Start,
    collector: tuple[Collector, TestServer],  # noqa: F811 (the fixture imported above)
) -> None:
    received, sink = collector
    tracing = f'tracing: {{otlp_endpoint: "http://127.0.0.1:{sink.port}", sample_ratio: 1.0}}'
    port, server = await serve(tracing)
    await talk(port, get("/c/s") + get("/c/s", CLOSE), ["GET", "GET"])
    await flush(server.gateway)
    await eventually(lambda: len(received.spans) == 3)  # two server spans, one forward

    roots = received.by_name("GET /c")
    assert len(roots) == 2
    statuses: list[Any] = [
        kv.value.int_value
        for root in roots
        for kv in root.attributes
        if kv.key == "http.response.status_code"
    ]
    assert statuses == [200, 200]
    children = {s.parent_span_id for s in received.spans if s not in roots}
    assert len(children) == 1  # only the miss called upstream


# --- the encoded head against the general path -------------------------------------------------

EDITED = """
version: 1
store: {{cache_dir: "{dir}"}}
services:
  up: {{targets: [$UP]}}
routes:
  - {{prefix: /plain, service: up, cache: {{ttl: 60s}}}}
  - prefix: /cors
    service: up
    cache: {{ttl: 60s}}
    cors: {{origins: [https://app.example], credentials: true}}
  - {{prefix: /limited, service: up, cache: {{ttl: 60s}}, rate_limit: {{limit: 100, per: 1h}}}}
  - prefix: /rules
    service: up
    cache: {{ttl: 60s}}
    response_headers:
      set: {{Cache-Control: "public, max-age=5", X-Extra: "1"}}
      remove: [Vary, X-Cache]
  - prefix: /written
    service: up
    cache: {{ttl: 60s}}
    response_headers: {{set: {{Date: "Thu, 01 Jan 2037 00:00:00 GMT"}}}}
"""
# The upstream's answer: its own Server and X-Request-ID (a hit replays neither), a Vary, and
# no Content-Type (a hit then gets aiohttp's default).
UPSTREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: up/1\r\nX-Request-ID: up-id\r\nCache-Control: max-age=60\r\n"
    b"Vary: Accept-Language\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 5\r\n\r\nhello"
)
VARYING = frozenset({"date", "x-request-id", "age", "ratelimit-reset"})


async def noop_prepare(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """An on_response_prepare handler beside apply_exchange: hits then take the general path."""


def normalized(answer: Answer) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, header lines and body, the per-answer values blanked. Lines of different
    names may come in another order (RFC 9110 §5.3: not significant; the general path
    replaces a header where it stood, the encoded one writes it after the entry's), so they
    are sorted by name; lines of one name keep their order."""
    pairs = [(n.lower(), "-" if n.lower() in VARYING else v) for n, v in answer.pairs]
    return answer.line, sorted(pairs, key=lambda pair: pair[0]), answer.body


@pytest.mark.parametrize(
    ("path", "lines"),
    [
        ("/plain/a", ()),
        ("/cors/a", ("Origin: https://app.example",)),
        ("/cors/a", ("Origin: https://other.example",)),
        ("/limited/a", ()),
        ("/rules/a", ()),
        ("/written/a", ()),
    ],
)
@pytest.mark.parametrize(("version", "connection", "kept"), KEEP_ALIVE_CASES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_encoded_hit_is_the_answer_the_general_path_gives(
    tmp_path: Path,
    path: str,
    lines: tuple[str, ...],
    version: str,
    connection: str,
    kept: bool,
    method: str,
) -> None:
    async with Upstream(answering(UPSTREAM_ANSWER)) as up:
        answers = []
        for name in ("encoded", "general"):
            text = EDITED.format(dir=tmp_path / name).replace("$UP", up.url)
            server = GatewayTestServer(compile_gateway(text))
            if name == "general":
                server.app.on_response_prepare.append(noop_prepare)
            await server.start_server()
            try:
                assert server.port is not None
                await miss(server, get(path, *lines, CLOSE))
                said = (connection,) if connection else ()
                data = get(path, *lines, *said, method=method, version=version)
                methods = [method]
                if kept:
                    data += get("/plain/last", CLOSE)
                    methods.append("GET")
                found, rest = await talk(server.port, data, methods)
                assert rest == b""
                answers.append(found)
            finally:
                await server.close()
    (encoded, *after), (general, *_) = answers
    assert normalized(encoded) == normalized(general)
    # Both paths ran: the general one replaces the entry's X-Request-ID where it stood (first),
    # the encoded one writes its own after Date. /written sets Date: the encoded path steps aside.
    assert general.pairs[0][0] == "X-Request-ID"
    assert (encoded.pairs[0][0] == "X-Request-ID") == path.startswith("/written")
    assert encoded.headers.get("x-cache", "HIT") == "HIT"
    assert len(after) == int(kept)


# --- the hit lane against aiohttp's connection loop ----------------------------------------------


def lane_of(server: GatewayTestServer) -> HitLane:
    """The hit lane of a started test server's connections."""
    connections = server.runner.server if server.runner is not None else None
    assert isinstance(connections, GatewayServer)
    assert connections.lane is not None
    return connections.lane


async def miss(server: GatewayTestServer, data: bytes) -> Answer:
    """The answer to `data` (one request, closing), once what it stored is in the hot map:
    the store's thread writes an entry after its MISS is sent, and a slow disk's sync would
    leave the next hits to the store's thread instead of the hot map."""
    cache = server.gateway.cache
    assert cache is not None
    assert server.port is not None
    store, held = cache.store, cache.store.hot_count()
    [answer], _ = await talk(server.port, data, ["GET"])
    if answer.headers.get("x-cache", "MISS") == "MISS" and answer.status == 200:  # or removed
        await eventually(lambda: store.hot_count() > held)
    return answer


def lane_off(server: GatewayTestServer) -> None:
    """Connections made from now on leave every request to aiohttp's loop."""
    connections = server.runner.server if server.runner is not None else None
    assert isinstance(connections, GatewayServer)
    connections.lane = None


def blanked(answer: Answer) -> bytes:
    """The answer's bytes as sent, the values that differ per answer blanked in place."""
    lines = [answer.line]
    for name, value in answer.pairs:
        lines.append(f"{name}: {'-' if name.lower() in VARYING else value}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + answer.body


# Answered in the lane: the route has only the cache stage, or header rules before it, and
# the wire encodes the entry. /written (a rule sets Date) and the routes with CORS or a rate
# limit are answered by aiohttp's loop either way.
IN_LANE: Final = frozenset({"/plain/a", "/rules/a"})


@pytest.mark.parametrize(
    ("path", "lines"),
    [
        ("/plain/a", ()),
        ("/plain/a", ("X-Request-ID: client.id-1",)),
        ("/plain/a", ("Accept-Language: fr",)),  # another Vary value: a miss, then its hit
        ("/cors/a", ("Origin: https://app.example",)),
        ("/limited/a", ()),
        ("/rules/a", ()),
        ("/written/a", ()),
    ],
)
@pytest.mark.parametrize(("version", "connection", "kept"), KEEP_ALIVE_CASES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_hit_in_the_lane_is_the_encoded_hit_byte_for_byte(
    tmp_path: Path,
    path: str,
    lines: tuple[str, ...],
    version: str,
    connection: str,
    kept: bool,
    method: str,
) -> None:
    async with Upstream(answering(UPSTREAM_ANSWER)) as up:
        answers, lanes = [], []
        for name in ("lane", "loop"):
            text = EDITED.format(dir=tmp_path / name).replace("$UP", up.url)
            server = GatewayTestServer(compile_gateway(text))
            await server.start_server()
            try:
                assert server.port is not None
                lane = lane_of(server)
                if name == "loop":
                    lane_off(server)
                await miss(server, get(path, *lines, CLOSE))
                said = (connection,) if connection else ()
                data = get(path, *lines, *said, method=method, version=version)
                methods = [method]
                if kept:
                    data += get("/plain/last", CLOSE)  # a miss after it, pipelined: in order
                    methods.append("GET")
                before = lane.answered
                found, rest = await talk(server.port, data, methods)
                assert rest == b""
                answers.append(found)
                lanes.append(lane.answered - before)
            finally:
                await server.close()
    (in_lane, *after_lane), (in_loop, *after_loop) = answers
    assert blanked(in_lane) == blanked(in_loop)
    assert in_lane.headers.get("x-cache", "HIT") == "HIT"  # /rules removes it
    if "X-Request-ID: client.id-1" in lines:
        assert in_lane.headers["x-request-id"] == in_loop.headers["x-request-id"] == "client.id-1"
    assert [blanked(a) for a in after_lane] == [blanked(a) for a in after_loop]
    assert lanes == [int(path in IN_LANE), 0]
