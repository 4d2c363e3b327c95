"""The lean upstream client (gateway/upstream/h1client.py) against raw-socket upstreams, most of
which misbehave on purpose: framing both ways, 1xx and 101, bodiless responses, keep-alive and its
end, malformed responses, the three timeouts, cancellation, flow control both ways, TLS, and
a property test that round-trips random heads and bodies byte for byte.

Every scenario runs on uvloop (production) and on asyncio's own loop."""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import itertools
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
import uvloop
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.model import Timeouts
from gateway.upstream.h1client import (
    MAX_HEAD,
    PAUSE_AT,
    RECV_BUFFER,
    RECV_SMALL,
    ConnectError,
    ConnectTimeout,
    H1Error,
    IncompleteBody,
    Limit,
    Pool,
    PoolFull,
    ProtocolError,
    ReadTimeout,
    RequestBodyError,
    Response,
    TotalTimeout,
    UpstreamClosed,
)
from tests.polling import eventually

LOOPS: Final = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
QUICK: Final = Timeouts(connect=2.0, read=2.0, total=None)
Script = Callable[["Upstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def on_both_loops(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """A test that runs `scenario` on each loop, within 20 s (a hang fails, never sticks)."""

    @pytest.mark.parametrize("loop", list(LOOPS))
    def test(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(asyncio.wait_for(scenario(), 20))

    test.__name__, test.__doc__ = scenario.__name__, scenario.__doc__
    return test


# --- raw upstreams ----------------------------------------------------------------------------


@dataclass
class Request:
    head: bytes  # request line and headers, up to and including the blank line
    body: bytes  # de-chunked when it came chunked

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


async def read_request(reader: asyncio.StreamReader) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    request = Request(head, b"")
    length = request.header(b"content-length")
    if length is not None:
        request.body = await reader.readexactly(int(length))
    elif request.header(b"transfer-encoding") == b"chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readexactly(2) == b"\r\n"
        request.body = b"".join(parts)
    return request


@dataclass
class Upstream:
    """A raw TCP (or TLS) server that runs `script` for each connection it accepts and
    records what it read."""

    script: Script
    tls: ssl.SSLContext | None = None
    connections: int = 0
    closed: int = 0  # connections whose script ended (the peer left, or the script did)
    requests: list[Request] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def request(self, reader: asyncio.StreamReader) -> Request:
        request = await read_request(reader)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.closed += 1
            writer.close()


def answering(*responses: bytes) -> Script:
    """A keep-alive script: each request gets the next response (the last one repeats)."""

    async def script(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(10_000):
            await up.request(reader)
            w.write(responses[min(i, len(responses) - 1)])
            await w.drain()

    return script


OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def pool_for(upstream: Upstream, timeouts: Timeouts = QUICK, limit: int = 8, **kw: Any) -> Pool:
    return Pool(upstream.url, Limit(limit), timeouts, **kw)


async def get(pool: Pool, method: str = "GET", path: str = "/") -> tuple[Response, bytes]:
    response = await pool.request(method, path, [("Accept", "*/*")])
    return response, await response.read()


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# --- framing ----------------------------------------------------------------------------------


@on_both_loops
async def test_small_gets_share_one_keep_alive_connection() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        for _ in range(5):
            response, body = await get(pool, path="/x?a=1")
            assert (response.status, response.reason, body) == (200, "OK", b"hello")
        assert up.connections == 1
        assert pool.idle == 1
        assert pool.limit.busy == 0
        assert up.requests[0].head == (
            f"GET /x?a=1 HTTP/1.1\r\nHost: {up.url[7:]}\r\nAccept: */*\r\n\r\n".encode()
        )
        pool.close()


@on_both_loops
async def test_a_target_base_path_prefixes_every_request_path() -> None:
    async with Upstream(answering(OK)) as up:
        pool = Pool(up.url + "/base/", Limit(1), QUICK)
        await get(pool, path="/items?q=%20")
        assert up.requests[0].line == b"GET /base/items?q=%20 HTTP/1.1"


@on_both_loops
async def test_headers_keep_their_order_case_and_repeats() -> None:
    response_bytes = (
        b"HTTP/1.1 201 Made It\r\nX-Multi: a\r\nset-cookie: 1\r\nX-Multi: b\r\n"
        b"X-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n"
    )
    async with Upstream(answering(response_bytes)) as up:
        response, body = await get(pool_for(up))
        assert response.headers == [
            ("X-Multi", "a"),
            ("set-cookie", "1"),
            ("X-Multi", "b"),
            ("X-Latin", "caf\udce9"),  # not UTF-8: surrogateescape keeps the byte
            ("X-Utf8", "café"),  # decoded as aiohttp's server decodes a request's headers
            ("Content-Length", "0"),
        ]
        assert response.headers[3][1].encode("utf-8", "surrogateescape") == b"caf\xe9"
        assert (response.status, response.reason, body) == (201, "Made It", b"")


@on_both_loops
async def test_a_content_length_body_bigger_than_a_read_arrives_whole() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: many reads
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
    async with Upstream(answering(head + payload)) as up:
        pool = pool_for(up)
        response = await pool.request("GET", "/", [])
        parts = [chunk async for chunk in response]
        assert b"".join(parts) == payload
        assert max(map(len, parts)) <= RECV_BUFFER
        assert pool.idle == 1  # read to the end: kept


@on_both_loops
async def test_a_chunked_body_is_dechunked_and_trailers_are_dropped() -> None:
    response_bytes = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with Upstream(answering(response_bytes, OK)) as up:
        pool = pool_for(up)
        response, body = await get(pool)
        assert body == b"hello world!"
        assert response.headers == [("Transfer-Encoding", "chunked")]
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 1


@on_both_loops
async def test_a_bytes_body_is_sent_with_its_content_length() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        big = b"b" * 100_000
        for body in (b"small", big):
            response = await pool.request("PUT", "/p", [("Content-Type", "x/y")], body)
            await response.read()
        assert [r.header(b"content-length") for r in up.requests] == [b"5", b"100000"]
        assert [r.body for r in up.requests] == [b"small", big]


@on_both_loops
async def test_a_post_without_a_body_says_content_length_zero_and_a_get_says_nothing() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        await get(pool, "POST")
        await get(pool, "GET")
        assert up.requests[0].header(b"content-length") == b"0"
        assert up.requests[1].header(b"content-length") is None


@on_both_loops
async def test_a_stream_without_a_length_goes_chunked() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        response = await pool.request("POST", "/", [], chunks_of(b"ab", b"", b"cde" * 1000))
        await response.read()
        assert up.requests[0].header(b"transfer-encoding") == b"chunked"
        assert up.requests[0].body == b"ab" + b"cde" * 1000
        assert pool.idle == 1


@on_both_loops
async def test_a_stream_with_a_content_length_is_sent_as_is() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        headers = [("Content-Length", "7")]
        response = await pool.request("POST", "/", headers, chunks_of(b"abc", b"defg"))
        await response.read()
        assert up.requests[0].body == b"abcdefg"
        assert up.requests[0].header(b"transfer-encoding") is None


@on_both_loops
async def test_an_aiohttp_stream_reader_is_streamed() -> None:
    loop = asyncio.get_running_loop()
    reader = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        sending = asyncio.ensure_future(pool.request("POST", "/", [], reader))
        for part in (b"one,", b"two,", b"three"):
            reader.feed_data(part)
            await asyncio.sleep(0)
        reader.feed_eof()
        await (await sending).read()
        assert up.requests[0].body == b"one,two,three"


@pytest.mark.parametrize(
    ("length", "parts"),
    [("10", (b"abc",)), ("2", (b"abc",)), ("x1", (b"abc",))],
    ids=["shorter", "longer", "not-a-number"],
)
def test_a_stream_that_disagrees_with_its_content_length_is_refused(
    length: str, parts: tuple[bytes, ...]
) -> None:
    async def scenario() -> None:
        async with Upstream(answering(OK)) as up:
            pool = pool_for(up)
            with pytest.raises(RequestBodyError):
                await pool.request("POST", "/", [("Content-Length", length)], chunks_of(*parts))
            assert pool.limit.busy == 0
            assert pool.idle == 0
            assert (await get(pool))[1] == b"hello"  # a new connection

    uvloop.run(asyncio.wait_for(scenario(), 20))


@on_both_loops
async def test_a_failing_body_source_is_a_request_body_error_with_its_cause() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise ConnectionResetError("client left")

    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        with pytest.raises(RequestBodyError) as caught:
            await pool.request("POST", "/", [], broken())
        assert isinstance(caught.value.__cause__, ConnectionResetError)
        assert pool.limit.busy == 0


@on_both_loops
async def test_an_early_answer_is_returned_and_its_connection_is_not_kept() -> None:
    async def early(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: answer before the body
        w.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig")
        await w.drain()
        await until_eof(reader)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1024
            await asyncio.sleep(0.001)

    async with Upstream(early) as up:
        pool = pool_for(up)
        response = await pool.request("POST", "/", [], endless())
        assert (response.status, await response.read()) == (413, b"big")
        assert pool.idle == 0
        assert pool.limit.busy == 0
        await eventually(lambda: up.closed == 1)


# --- 1xx, 101 and bodiless responses --------------------------------------------------------


@on_both_loops
async def test_informational_responses_are_skipped() -> None:
    response_bytes = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nhi"
    )
    async with Upstream(answering(response_bytes, OK)) as up:
        pool = pool_for(up)
        response, body = await get(pool)
        assert (response.status, response.reason, body) == (200, "OK", b"hi")
        assert response.headers == [("Content-Length", "2"), ("X-Final", "yes")]
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 1


@on_both_loops
async def test_a_101_is_returned_with_the_new_protocols_bytes_and_never_pooled() -> None:
    async def upgrade(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nRAW")
        await w.drain()
        w.write(b"MORE")
        await w.drain()

    async with Upstream(upgrade) as up:
        pool = pool_for(up)
        response = await pool.request("GET", "/", [("Upgrade", "x")])
        assert response.status == 101
        assert ("Upgrade", "x") in response.headers
        assert await response.read() == b"RAWMORE"  # until the upstream closes
        assert pool.idle == 0
        assert pool.limit.busy == 0


@on_both_loops
async def test_a_head_response_has_no_body_and_its_connection_is_kept() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    async with Upstream(answering(head, OK)) as up:
        pool = pool_for(up)
        response, body = await get(pool, "HEAD")
        assert (response.status, body) == (200, b"")
        assert ("Content-Length", "1234") in response.headers
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 1


@on_both_loops
async def test_a_head_response_followed_by_bytes_closes_its_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"  # a body a HEAD must not get
    async with Upstream(answering(head, OK)) as up:
        pool = pool_for(up)
        assert (await get(pool, "HEAD"))[1] == b""
        assert pool.idle == 0
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 2


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body_whatever_their_headers_say(status: int) -> None:
    async def scenario() -> None:
        head = b'HTTP/1.1 %d X\r\nContent-Length: 5\r\nETag: "e"\r\n\r\n' % status
        async with Upstream(answering(head, OK)) as up:
            pool = pool_for(up)
            response, body = await get(pool)
            assert (response.status, body) == (status, b"")
            assert (await get(pool))[1] == b"hello"
            assert up.connections == 1

    uvloop.run(asyncio.wait_for(scenario(), 20))


# --- the end of keep-alive ------------------------------------------------------------------


@on_both_loops
async def test_connection_close_is_honoured() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
    async with Upstream(answering(closing)) as up:
        pool = pool_for(up)
        for _ in range(3):
            assert (await get(pool))[1] == b"hello"
        assert up.connections == 3
        assert pool.idle == 0


@on_both_loops
async def test_an_http10_response_without_length_is_read_to_eof() -> None:
    async def http10(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for part in (b"no ", b"length ", b"at all"):
            w.write(part)
            await w.drain()

    async with Upstream(http10) as up:
        pool = pool_for(up)
        response, body = await get(pool)
        assert (response.version, body) == ("1.0", b"no length at all")
        assert pool.idle == 0
        assert pool.limit.busy == 0


@on_both_loops
async def test_an_http10_keep_alive_response_is_kept() -> None:
    keep = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"
    async with Upstream(answering(keep)) as up:
        pool = pool_for(up)
        for _ in range(3):
            assert (await get(pool))[1] == b"hello"
        assert up.connections == 1


@on_both_loops
async def test_an_idle_connection_the_upstream_closed_is_not_reused() -> None:
    async def once(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(OK)  # keep-alive offered, then the upstream closes the idle connection
        await w.drain()

    async with Upstream(once) as up:
        pool = pool_for(up)
        assert (await get(pool))[1] == b"hello"
        await eventually(lambda: pool.idle == 0)  # seen before any reuse
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 2


async def close_on_second(
    up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    """Answers one request, then takes the next one and closes without a word: the race
    where an idle close crosses a new request."""
    await up.request(reader)
    w.write(OK)
    await w.drain()
    await up.request(reader)


@on_both_loops
async def test_a_reused_connection_closed_before_answering_says_it_was_sent() -> None:
    async with Upstream(close_on_second) as up:
        pool = pool_for(up)
        await get(pool)
        with pytest.raises(UpstreamClosed) as caught:
            await get(pool)
        assert caught.value.sent
        assert caught.value.reused
        assert pool.limit.busy == 0


@on_both_loops
async def test_retry_stale_resends_once_on_a_new_connection() -> None:
    async with Upstream(close_on_second) as up:
        pool = pool_for(up)
        await get(pool)
        response = await pool.request("GET", "/again", [], None, retry_stale=True)
        assert await response.read() == b"hello"
        assert up.connections == 2
        assert [r.line for r in up.requests][-2:] == [
            b"GET /again HTTP/1.1",
            b"GET /again HTTP/1.1",
        ]


@on_both_loops
async def test_retry_stale_never_resends_a_stream() -> None:
    async with Upstream(close_on_second) as up:
        pool = pool_for(up)
        await get(pool)
        with pytest.raises(UpstreamClosed):
            await pool.request("POST", "/", [], chunks_of(b"x"), retry_stale=True)
        assert up.connections == 1


@on_both_loops
async def test_a_fresh_connection_closed_before_answering_is_not_resent() -> None:
    async def mute(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)

    async with Upstream(mute) as up:
        pool = pool_for(up)
        with pytest.raises(UpstreamClosed) as caught:
            await pool.request("GET", "/", [], retry_stale=True)
        assert caught.value.sent
        assert not caught.value.reused
        assert up.connections == 1


@on_both_loops
async def test_bytes_after_a_response_close_its_connection_but_the_response_stands() -> None:
    trailing = OK + b"GARBAGE"
    async with Upstream(answering(trailing, OK)) as up:
        pool = pool_for(up)
        assert (await get(pool))[1] == b"hello"
        assert pool.idle == 0
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 2


# --- malformed responses --------------------------------------------------------------------

MALFORMED: Final = {
    "bad status line": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "not http": b"SSH-2.0-OpenSSH\r\n\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "conflicting content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
    b"\r\nhello",
    "content-length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "space before a colon": b"HTTP/1.1 200 OK\r\nX-Bad : a\r\nContent-Length: 0\r\n\r\n",
    "obsolete line folding": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "negative content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "too many 1xx": b"HTTP/1.1 100 Continue\r\n\r\n" * 40 + OK,
    "head too large": b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n",
}
MID_BODY: Final = {
    "ends mid content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
    "ends mid chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    "bad chunk after a good one": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\nQQ\r\n",
}


def close_after(response_bytes: bytes) -> Script:
    """The first connection gets `response_bytes` and is closed; later ones get OK."""

    async def script(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = up.connections == 1
        await up.request(reader)
        w.write(response_bytes if first else OK)
        await w.drain()
        if not first:
            await answering(OK)(up, reader, w)

    return script


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_response_is_a_protocol_error_that_never_poisons_the_pool(
    case: str, loop: str
) -> None:
    async def scenario() -> None:
        async with Upstream(close_after(MALFORMED[case])) as up:
            pool = pool_for(up)
            with pytest.raises(ProtocolError):
                await get(pool)
            assert pool.limit.busy == 0
            assert pool.idle == 0
            for _ in range(2):
                assert (await get(pool))[1] == b"hello"
            assert up.connections == 2

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("case", list(MID_BODY))
def test_a_body_cut_short_raises_while_reading_and_never_poisons_the_pool(
    case: str, loop: str
) -> None:
    async def scenario() -> None:
        async with Upstream(close_after(MID_BODY[case])) as up:
            pool = pool_for(up)
            with pytest.raises(ProtocolError) as caught:  # at once, or once the head is read
                await (await pool.request("GET", "/", [])).read()
            if case.startswith("ends"):
                assert isinstance(caught.value, IncompleteBody)
            assert pool.limit.busy == 0
            assert pool.idle == 0
            assert (await get(pool))[1] == b"hello"
            assert up.connections == 2

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))


@on_both_loops
async def test_bytes_sent_to_an_idle_connection_close_it() -> None:
    async def chatty(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(OK)
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")  # nobody asked
        await w.drain()
        await answering(OK)(up, reader, w)

    async with Upstream(chatty) as up:
        pool = pool_for(up)
        await get(pool)
        await eventually(lambda: pool.idle == 0)
        assert (await get(pool))[1] == b"hello"
        assert up.connections == 2


# --- timeouts ---------------------------------------------------------------------------------


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Read and drop until the client hangs up (so that `closed` counts it)."""
    while await reader.read(65536):
        pass


async def hang(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await up.request(reader)
    await until_eof(reader)


@on_both_loops
async def test_a_silent_upstream_is_a_read_timeout() -> None:
    async with Upstream(hang) as up:
        pool = pool_for(up, Timeouts(connect=2, read=0.2, total=None))
        with pytest.raises(ReadTimeout) as caught:
            await get(pool)
        assert isinstance(caught.value, TimeoutError)
        assert not isinstance(caught.value, ConnectError)
        assert caught.value.sent
        assert pool.limit.busy == 0
        await eventually(lambda: up.closed == 1)  # the connection was dropped


@on_both_loops
async def test_silence_mid_body_is_a_read_timeout() -> None:
    async def stall(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.Event().wait()

    async with Upstream(stall) as up:
        pool = pool_for(up, Timeouts(connect=2, read=0.2, total=None))
        response = await pool.request("GET", "/", [])
        assert await response.read_chunk() == b"abc"
        with pytest.raises(ReadTimeout):
            await response.read_chunk()
        assert pool.limit.busy == 0
        assert pool.idle == 0


@on_both_loops
async def test_a_trickling_upstream_is_cut_by_the_total_timeout() -> None:
    async def trickle(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            w.write(b"1\r\nx\r\n")
            await w.drain()
            await asyncio.sleep(0.02)

    async with Upstream(trickle) as up:
        pool = pool_for(up, Timeouts(connect=2, read=0.15, total=0.4))
        started = asyncio.get_running_loop().time()
        response = await pool.request("GET", "/", [])
        with pytest.raises(TotalTimeout):
            await response.read()
        assert 0.35 < asyncio.get_running_loop().time() - started < 2
        assert pool.limit.busy == 0


@on_both_loops
async def test_a_stalled_tls_handshake_is_a_connect_timeout() -> None:
    async def mute(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()  # plain TCP accepted; no ServerHello ever comes

    async with Upstream(mute) as up:
        url = up.url.replace("http://", "https://")
        pool = Pool(url, Limit(2), Timeouts(connect=0.2, read=5, total=None), ssl=client_tls())
        with pytest.raises(ConnectTimeout) as caught:
            await get(pool)
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, ConnectError)
        assert not caught.value.sent
        assert pool.limit.busy == 0


@on_both_loops
async def test_a_refused_connection_is_a_connect_error() -> None:
    async with Upstream(hang) as up:
        url = up.url
    pool = Pool(url, Limit(2), QUICK)  # the server is gone: nobody listens there now
    with pytest.raises(ConnectError) as caught:
        await get(pool)
    assert not isinstance(caught.value, TimeoutError)
    assert pool.limit.busy == 0
    assert "127.0.0.1" not in str(caught.value)


# --- cancellation and the pool's limit ---------------------------------------------------------


@on_both_loops
async def test_cancelling_while_waiting_for_the_head_discards_the_connection() -> None:
    async with Upstream(hang) as up:
        pool = pool_for(up)
        waiting = asyncio.ensure_future(get(pool))
        await eventually(lambda: len(up.requests) == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.limit.busy == 0
        assert pool.idle == 0
        await eventually(lambda: up.closed == 1)


@on_both_loops
async def test_cancelling_mid_body_discards_the_connection() -> None:
    async def slow(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()
        await until_eof(reader)

    async with Upstream(slow) as up:
        pool = pool_for(up)
        response = await pool.request("GET", "/", [])
        assert await response.read_chunk() == b"abc"
        reading = asyncio.ensure_future(response.read_chunk())
        await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        response.release()  # what a relay's `finally` does: it must not pool the connection
        assert pool.limit.busy == 0
        assert pool.idle == 0
        await eventually(lambda: up.closed == 1)


@on_both_loops
async def test_releasing_an_unfinished_body_closes_the_connection() -> None:
    payload = b"z" * 1_000_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
    async with Upstream(answering(head + payload)) as up:
        pool = pool_for(up)
        response = await pool.request("GET", "/", [])
        await response.read_chunk()
        response.release()
        assert pool.idle == 0
        assert pool.limit.busy == 0
        await eventually(lambda: up.closed == 1)


@on_both_loops
async def test_an_exhausted_pool_raises_at_once_and_frees_on_release() -> None:
    async with Upstream(answering(OK)) as up:
        limit = Limit(2)
        pools = [Pool(up.url, limit, QUICK), Pool(up.url + "/other", limit, QUICK)]
        held = [await pools[0].request("GET", "/", []), await pools[1].request("GET", "/", [])]
        with pytest.raises(PoolFull) as caught:
            await pools[0].request("GET", "/", [])
        assert not caught.value.sent
        assert len(up.requests) == 2
        held[0].release()
        assert (await get(pools[1]))[1] == b"hello"
        held[1].release()
        assert limit.busy == 0


@on_both_loops
async def test_a_closed_pool_closes_its_idle_connections_and_refuses_requests() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up)
        await get(pool)
        pool.close()
        await eventually(lambda: up.closed == 1)
        with pytest.raises(H1Error):
            await get(pool)


@on_both_loops
async def test_connections_of_one_pool_share_its_receive_buffer_without_mixing_bodies() -> None:
    bodies = [bytes([65 + i]) * (700_000 + 4099 * i) for i in range(6)]  # many reads each

    async def by_path(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(100):
            request = await up.request(reader)
            body = bodies[int(request.line.split()[1].strip(b"/"))]
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for start in range(0, len(body), 50_000):  # in pieces, interleaving the six
                w.write(body[start : start + 50_000])
                await w.drain()

    async with Upstream(by_path) as up:
        pool = pool_for(up)

        async def fetch(i: int) -> bytes:
            response = await pool.request("GET", f"/{i}", [])
            return await response.read(limit=1 << 21)

        got = await asyncio.gather(*(fetch(i) for i in range(len(bodies))))
        assert got == bodies
        assert up.connections == len(bodies)


# --- flow control ---------------------------------------------------------------------------


@on_both_loops
async def test_a_consumer_that_stops_reading_pauses_the_upstream() -> None:
    size = 16 * 1024 * 1024
    writers: list[asyncio.StreamWriter] = []

    async def flood(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        writers.append(w)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"f" * 65536
        for _ in range(size // len(block)):
            w.write(block)
            await w.drain()

    async with Upstream(flood) as up:
        pool = pool_for(up)
        response = await pool.request("GET", "/", [])
        await eventually(lambda: bool(writers) and writers[0].transport.get_write_buffer_size() > 0)
        await asyncio.sleep(0.1)  # give an unbounded reader time to show itself
        # The head's read may fill the buffer; reads while nobody waits take RECV_SMALL.
        bound = max(RECV_BUFFER, PAUSE_AT + RECV_SMALL)
        assert response.buffered() <= bound
        received = 0
        async for chunk in response:
            received += len(chunk)
            assert response.buffered() <= PAUSE_AT + RECV_BUFFER
        assert received == size
        assert pool.idle == 1


@on_both_loops
async def test_an_upstream_that_stops_reading_pauses_the_request_body() -> None:
    pulled = 0
    reading = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1024):  # 64 MiB on offer
            pulled += 1
            yield b"s" * 65536

    async def lazy(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reading.wait()
        total = 0
        while total < 1024 * 65536:
            total += len(await reader.read(1 << 20))
        up.requests.append(Request(head, b""))
        w.write(OK)
        await w.drain()

    async with Upstream(lazy) as up:
        pool = pool_for(up, Timeouts(connect=2, read=30, total=None))
        sending = asyncio.ensure_future(
            pool.request("PUT", "/", [("Content-Length", str(1 << 26))], source())
        )
        await eventually(lambda: pulled > 0)
        await asyncio.sleep(0.2)
        assert pulled < 200  # the kernel buffers hold a few MiB, not the whole 64 MiB
        reading.set()
        assert await (await sending).read() == b"hello"
        assert pulled == 1024


# --- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def make_certs() -> Certs:
    """A CA and a certificate it signed for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Certs(
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


CERTS: Final = make_certs()


def client_tls(trusted: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the hostname
    if trusted:
        context.load_verify_locations(cadata=CERTS.ca_pem.decode())
    return context


def server_tls(tmp: Any) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    cert.write_bytes(CERTS.cert_pem)
    key.write_bytes(CERTS.key_pem)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def tls_server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return server_tls(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("loop", list(LOOPS))
def test_https_targets_are_verified_and_spoken_to_over_tls(
    loop: str, tls_server_context: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        async with Upstream(answering(chunked), tls=tls_server_context) as up:
            pool = Pool(up.url, Limit(2), QUICK, ssl=client_tls())
            for _ in range(3):
                response = await pool.request("POST", "/", [], chunks_of(b"up", b"load"))
                assert await response.read() == b"hello"
            assert up.connections == 1
            assert [r.body for r in up.requests] == [b"upload"] * 3
            untrusting = Pool(up.url, Limit(2), QUICK, ssl=client_tls(trusted=False))
            with pytest.raises(ConnectError) as caught:
                await get(untrusting)
            assert "certificate" in str(caught.value).lower()
            pool.close()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))


# --- the property: random heads and bodies, byte for byte ---------------------------------------

token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
    min_size=1,
    max_size=20,
).filter(lambda n: n.lower() not in {"content-length", "transfer-encoding", "host", "connection"})
value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
header_sets = st.lists(st.tuples(token, value), max_size=12)
cuts = st.lists(st.integers(0, 200_000), max_size=8)


def pieces(data: bytes, at: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in at)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    request_headers=header_sets,
    response_headers=header_sets,
    request_size=st.integers(0, 150_000),
    response_size=st.integers(0, 150_000),
    request_cuts=cuts,
    response_cuts=cuts,
    chunked_up=st.booleans(),
    chunked_down=st.booleans(),
)
def test_heads_and_bodies_round_trip_byte_for_byte(
    request_headers: list[tuple[str, str]],
    response_headers: list[tuple[str, str]],
    request_size: int,
    response_size: int,
    request_cuts: list[int],
    response_cuts: list[int],
    chunked_up: bool,
    chunked_down: bool,
) -> None:
    request_body = bytes(i % 251 for i in range(request_size))
    response_body = bytes((i * 7) % 253 for i in range(response_size))
    pending: list[bytes] = []

    async def echo(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await up.request(reader)
            w.write(pending.pop())
            await w.drain()

    async def scenario() -> None:
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(
            f"{n}: {v}\r\n".encode() for n, v in response_headers
        )
        if chunked_down:
            framed = b"".join(
                b"%x\r\n%s\r\n" % (len(p), p) for p in pieces(response_body, response_cuts)
            )
            pending.append(head + b"Transfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n")
        else:
            pending.append(head + b"Content-Length: %d\r\n\r\n" % response_size + response_body)
        async with Upstream(echo) as up:
            pool = pool_for(up)
            headers = list(request_headers)
            if not chunked_up:
                headers.append(("Content-Length", str(request_size)))
            response = await pool.request(
                "POST", "/rt", headers, chunks_of(*pieces(request_body, request_cuts))
            )
            assert await response.read() == response_body
            expected_headers = list(response_headers)
            expected_headers.append(
                ("Transfer-Encoding", "chunked")
                if chunked_down
                else ("Content-Length", str(response_size))
            )
            assert response.headers == expected_headers
            seen = up.requests[0]
            assert seen.body == request_body
            sent_headers = seen.head.split(b"\r\n")[2:-2]
            framing = [b"Transfer-Encoding: chunked"] if chunked_up else []
            assert sent_headers == [f"{n}: {v}".encode() for n, v in headers] + framing
            assert pool.idle == 1
            pool.close()

    uvloop.run(asyncio.wait_for(scenario(), 20))


@on_both_loops
async def test_a_closed_connection_is_freed_without_the_garbage_collector() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
    async with Upstream(answering(closing)) as up:
        pool = pool_for(up)
        gc.collect()
        gc.disable()
        try:
            assert (await get(pool))[1] == b"hello"
            await eventually(lambda: up.closed == 1)
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept to be looked at
            gc.collect()
            leaked = [o for o in gc.garbage if type(o).__name__ == "_Connection"]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not leaked  # its 64 KiB buffer went when the last reference did


@on_both_loops
async def test_a_connection_idle_past_the_idle_timeout_is_not_reused() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up, idle_timeout=0.05)
        await get(pool)
        await asyncio.sleep(0.1)  # the time passing is what is tested, not a wait for an event
        await get(pool)
        assert up.connections == 2
        await eventually(lambda: up.closed == 1)  # the stale one was closed, not leaked


@on_both_loops
async def test_rcvbuf_is_set_on_upstream_sockets() -> None:
    async with Upstream(answering(OK)) as up:
        pool = pool_for(up, rcvbuf=32768)
        response = await pool.request("GET", "/", [])
        sock = response._conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 65536  # doubled by Linux
        await response.read()
