"""The forward action on the wire, through the gateway, against raw-socket upstreams that
misbehave on purpose (issue 17): framing both ways, 1xx, bodiless responses, Connection:
close and HTTP/1.0, stale keep-alive connections, malformed responses, the three timeouts,
a client that leaves, TLS; and a property test that round-trips random heads and bodies
through the gateway byte for byte. tests/gateway/test_h1client.py tests the client alone."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from gateway.config.build import load_text
from gateway.http.hopbyhop import REQUEST_DROP
from gateway.runtime.state import Gateway
from tests.certs import Authority
from tests.gateway.conftest import GatewayClient, GatewayTestServer, MakeGateway
from tests.gateway.test_h1client import (
    MALFORMED,
    MID_BODY,
    OK,
    Script,
    Upstream,
    answering,
    close_after,
    hang,
    until_eof,
)
from tests.polling import eventually

DEFAULT_SERVICE: Final = "{targets: [$URL]}"


def routes(url: str, service: str = DEFAULT_SERVICE, *more: str) -> str:
    """One service `up` (its settings in flow style, $URL for the target) on prefix /."""
    extra = "".join(f"  {line}\n" for line in more)
    return (
        f"version: 1\nservices:\n  up: {service.replace('$URL', url)}\n{extra}"
        "routes:\n  - {prefix: /, service: up}\n"
    )


async def gateway_for(
    make_gateway: MakeGateway, up: Upstream, service: str = DEFAULT_SERVICE
) -> GatewayClient:
    return await make_gateway(routes(up.url, service))


# --- framing both ways ------------------------------------------------------------------------


async def test_chunked_and_content_length_responses_reach_the_client_whole(
    make_gateway: MakeGateway,
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijklmn"
    async with Upstream(answering(chunked, sized)) as up:
        client = await gateway_for(make_gateway, up)
        first = await client.get("/a")
        assert (first.status, await first.read()) == (200, b"abcdefg")
        second = await client.get("/b")
        assert (second.status, await second.read()) == (200, b"hijklmn")
        assert second.headers["Content-Length"] == "7"
        assert up.connections == 1  # both on one kept connection


async def test_chunked_and_content_length_uploads_reach_the_upstream_whole(
    make_gateway: MakeGateway,
) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    async with Upstream(answering(OK)) as up:
        client = await gateway_for(make_gateway, up)
        assert (await client.post("/chunked", data=parts())).status == 200
        assert (await client.post("/sized", data=b"x" * 70_000)).status == 200
        chunked, sized = up.requests
        assert chunked.header(b"transfer-encoding") == b"chunked"
        assert chunked.body == b"one,two,three"
        assert (sized.header(b"content-length"), sized.body) == (b"70000", b"x" * 70_000)
        assert sized.header(b"transfer-encoding") is None


# --- 1xx, HEAD, 204, 304 ----------------------------------------------------------------------


async def test_informational_responses_are_skipped(make_gateway: MakeGateway) -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    async with Upstream(answering(early + OK)) as up:
        client = await gateway_for(make_gateway, up)
        response = await client.get("/")
        assert (response.status, await response.read()) == (200, b"hello")
        assert "Link" not in response.headers


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 10\r\n\r\n'),
    ],
)
async def test_head_204_and_304_have_no_body_and_keep_their_connection(
    make_gateway: MakeGateway, method: str, answer: bytes
) -> None:
    async with Upstream(answering(answer, OK)) as up:
        client = await gateway_for(make_gateway, up)
        response = await client.request(method, "/")
        assert await response.read() == b""
        after = await client.get("/next")
        assert (after.status, await after.read()) == (200, b"hello")
        assert up.connections == 1  # nothing of a body was waited for, or taken as the next


# --- Connection: close, HTTP/1.0 --------------------------------------------------------------


def once(answer: bytes) -> Script:
    """Each connection answers one request with `answer`, then the upstream closes it."""

    async def script(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(answer)
        await w.drain()

    return script


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\n\r\nhello",  # no length: the body ends with the connection
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
    ],
)
async def test_connection_close_and_http10_upstreams_are_answered_and_never_reused(
    make_gateway: MakeGateway, answer: bytes
) -> None:
    async with Upstream(once(answer)) as up:
        client = await gateway_for(make_gateway, up, "{targets: [$URL], retries: 0}")
        for _ in range(3):
            response = await client.get("/")
            assert (response.status, await response.read()) == (200, b"hello")
        assert up.connections == 3


# --- stale keep-alive connections -------------------------------------------------------------


async def test_an_idle_connection_the_upstream_closed_is_not_reused(
    make_gateway: MakeGateway,
) -> None:
    async with Upstream(once(OK)) as up:  # keep-alive said, then closed after each answer
        client = await gateway_for(make_gateway, up, "{targets: [$URL], retries: 0}")
        assert (await client.get("/")).status == 200
        await eventually(lambda: up.closed == 1)
        response = await client.get("/")
        assert (response.status, await response.read()) == (200, b"hello")
        assert up.connections == 2


def closes_the_second_request_unanswered() -> Script:
    """Answers a connection's first request; closes it when its second one comes (the close
    crossing a request on a kept connection, as an upstream's idle timeout does)."""

    async def script(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(OK)
        await w.drain()
        await up.request(reader)

    return script


async def test_a_get_crossing_a_stale_close_is_resent_once_without_retries(
    make_gateway: MakeGateway,
) -> None:
    async with Upstream(closes_the_second_request_unanswered()) as up:
        client = await gateway_for(make_gateway, up, "{targets: [$URL], retries: 0}")
        assert (await client.get("/")).status == 200
        response = await client.get("/again")
        assert (response.status, await response.read()) == (200, b"hello")
        assert [r.line for r in up.requests] == [
            b"GET / HTTP/1.1",
            b"GET /again HTTP/1.1",  # on the stale connection: lost
            b"GET /again HTTP/1.1",  # once more, on a new one
        ]


async def test_a_post_crossing_a_stale_close_is_not_resent(make_gateway: MakeGateway) -> None:
    async with Upstream(closes_the_second_request_unanswered()) as up:
        client = await gateway_for(make_gateway, up, "{targets: [$URL], retries: 0}")
        assert (await client.get("/")).status == 200
        response = await client.post("/order", data=b"once")
        assert response.status == 502
        assert len(up.requests) == 2  # never twice: the upstream may have acted on it


# --- malformed responses ----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_response_is_502_and_never_poisons_the_pool(
    make_gateway: MakeGateway, case: str
) -> None:
    async with Upstream(close_after(MALFORMED[case])) as up:
        client = await gateway_for(make_gateway, up)
        response = await client.get("/")
        assert response.status == 502
        assert (await response.json())["type"].endswith("/upstream-unavailable")
        for _ in range(2):
            good = await client.get("/")
            assert (good.status, await good.read()) == (200, b"hello")
        assert up.connections == 2


@pytest.mark.parametrize("case", list(MID_BODY))
async def test_a_body_broken_mid_way_breaks_the_clients_and_never_poisons_the_pool(
    make_gateway: MakeGateway, case: str
) -> None:
    async with Upstream(close_after(MID_BODY[case])) as up:
        client = await gateway_for(make_gateway, up)
        response = await client.get("/")
        if response.status != 502:  # all of it in one read: refused before the head
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # broken, never looking whole
                await response.read()
        good = await client.get("/")
        assert (good.status, await good.read()) == (200, b"hello")
        assert up.connections == 2


# --- timeouts ---------------------------------------------------------------------------------


async def test_a_stalled_connect_is_504_and_a_post_goes_on_to_the_next_target(
    make_gateway: MakeGateway,
) -> None:
    async def mute(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await until_eof(reader)  # TCP accepted; the TLS handshake is never answered

    async with Upstream(mute) as stalled, Upstream(answering(OK)) as good:
        https = stalled.url.replace("http://", "https://")
        alone = await make_gateway(routes(https, "{targets: [$URL], timeouts: {connect: 200ms}}"))
        assert (await alone.get("/")).status == 504
        both = await make_gateway(
            routes(
                https,
                f"{{targets: [$URL, {good.url}], retries: 1, balance: round_robin,"
                " timeouts: {connect: 200ms}}",
            )
        )
        statuses = [(await both.post("/", data=b"p")).status for _ in range(2)]
        assert statuses == [200, 200]  # nothing was sent: even a POST may go elsewhere
        assert [r.body for r in good.requests] == [b"p", b"p"]


async def test_a_silent_upstream_is_504_and_its_connection_dropped(
    make_gateway: MakeGateway,
) -> None:
    async with Upstream(hang) as up:
        client = await gateway_for(make_gateway, up, "{targets: [$URL], timeouts: {read: 200ms}}")
        response = await client.get("/")
        assert response.status == 504
        await eventually(lambda: up.closed == 1)


async def test_silence_mid_body_breaks_the_clients_body(make_gateway: MakeGateway) -> None:
    async def stall(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await until_eof(reader)

    async with Upstream(stall) as up:
        client = await gateway_for(make_gateway, up, "{targets: [$URL], timeouts: {read: 200ms}}")
        response = await client.get("/")
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        await eventually(lambda: up.closed == 1)


async def test_a_trickling_upstream_is_cut_by_the_total_timeout(
    make_gateway: MakeGateway,
) -> None:
    async def trickle(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.request(reader)
        for byte in b"HTTP/1.1 200 OK\r\n":  # a byte every 50 ms: never silent for long
            w.write(bytes([byte]))
            await w.drain()
            await asyncio.sleep(0.05)
        await until_eof(reader)

    async with Upstream(trickle) as up:
        service = "{targets: [$URL], timeouts: {read: 1s, total: 300ms}}"
        client = await gateway_for(make_gateway, up, service)
        started = asyncio.get_running_loop().time()
        response = await client.get("/")
        assert response.status == 504
        assert asyncio.get_running_loop().time() - started < 0.8


# --- a client that leaves ---------------------------------------------------------------------


async def test_a_client_that_leaves_mid_body_has_its_upstream_connection_discarded(
    make_gateway: MakeGateway,
) -> None:
    async def endless(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await up.request(reader)
        if request.line.startswith(b"GET /stream"):
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                w.write(b"4000\r\n" + b"s" * 0x4000 + b"\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
        w.write(OK)
        await answering(OK)(up, reader, w)

    async with Upstream(endless) as up:
        client = await gateway_for(make_gateway, up)
        service = client.server.gateway.services["up"]  # type: ignore[attr-defined]
        response = await client.get("/stream")
        await response.content.readexactly(65536)
        response.close()  # the client leaves mid-body
        await eventually(lambda: up.closed == 1)  # the connection went, it was not pooled
        await eventually(lambda: service.targets[0].in_flight == 0)
        after = await client.get("/")
        assert (after.status, await after.read()) == (200, b"hello")
        assert up.connections == 2


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture
async def tls_raw(tmp_path: Path) -> tuple[Authority, ssl.SSLContext]:
    authority = await asyncio.to_thread(Authority, tmp_path)
    issued = await asyncio.to_thread(authority.issue, "upstream")
    return authority, await asyncio.to_thread(authority.server_context, issued)


async def test_an_https_target_is_verified_and_its_connection_kept(
    aiohttp_client: AiohttpClient, tls_raw: tuple[Authority, ssl.SSLContext]
) -> None:
    authority, server = tls_raw
    async with Upstream(answering(OK), tls=server) as up:
        trusted = await serve_off_loop(
            aiohttp_client,
            routes(up.url, f"{{targets: [$URL], tls: {{ca_file: {authority.file}}}}}"),
        )
        for _ in range(2):
            response = await trusted.get("/")
            assert (response.status, await response.read()) == (200, b"hello")
        assert up.connections == 1
        untrusted = await serve_off_loop(aiohttp_client, routes(up.url))  # unknown to system CAs
        refused = await untrusted.get("/")
        assert refused.status == 502
        assert "its TLS certificate could not be verified" in await refused.text()


async def serve_off_loop(aiohttp_client: AiohttpClient, text: str) -> TestClient[Any, Any]:
    """A gateway whose routes read files (a CA): loaded off the event loop."""
    result = await asyncio.to_thread(load_text, text, "routes.yaml", {})
    assert result.config is not None, [str(e) for e in result.errors]
    return await aiohttp_client(GatewayTestServer(Gateway(result.config)))


# --- a property: anything relayed comes out as it went in -------------------------------------

TOKEN: Final = (
    st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
    .map(lambda name: "X-" + name)
    .filter(lambda name: name.lower() not in REQUEST_DROP)
)
VALUE: Final = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éüß€"),
    max_size=40,
).map(str.strip)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    headers=st.lists(st.tuples(TOKEN, VALUE), max_size=8),
    body=st.binary(max_size=200_000),
    cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=6),
    chunked=st.booleans(),
)
async def test_heads_and_bodies_round_trip_through_the_gateway_byte_for_byte(
    make_gateway: MakeGateway,
    headers: list[tuple[str, str]],
    body: bytes,
    cuts: list[int],
    chunked: bool,
) -> None:
    pieces, at = [], 0
    for cut in cuts:
        if at < len(body):
            pieces.append(body[at : at + cut])
            at += cut
    pieces.append(body[at:])
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
        answer = b"HTTP/1.1 200 OK\r\n" + head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    else:
        answer = b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def script(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await up.request(reader)
            for at in range(0, len(answer), 65536):  # written in pieces, as it comes
                w.write(answer[at : at + 65536])
                await w.drain()

    sent = [(name, value) for name, value in headers]
    async with Upstream(script) as up:
        client = await gateway_for(make_gateway, up)
        response = await client.post("/", data=body, headers=sent)
        got = await response.read()
        assert response.status == 200
        assert got == body
        assert up.requests[0].body == body
        relayed = [
            (name, value)
            for name, value in response.raw_headers
            if name.startswith(b"X-") and name != b"X-Request-ID"  # the gateway's
        ]
        assert relayed == [(n.encode(), v.encode()) for n, v in headers]
        own = (b"x-forwarded", b"x-request-id")  # the gateway's
        forwarded = [
            line
            for line in up.requests[0].head.split(b"\r\n")
            if line.startswith(b"X-") and not line.lower().startswith(own)
        ]
        assert forwarded == [b"%s: %s" % (n.encode(), v.encode()) for n, v in headers]
