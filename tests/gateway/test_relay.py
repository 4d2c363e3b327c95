"""The relay's own head and body writes (http/relay.py `RelayedResponse`), seen by raw-socket
clients: the framing aiohttp would choose for the client's version, a body that came whole
sent with its end, chunked framing exact to the byte, and the requests the gateway's request
factory makes (servers/public.py) reading the same facts aiohttp's properties would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from gateway.ops import accesslog
from gateway.servers.public import create_app
from tests.gateway.conftest import GatewayClient, GatewayTestServer, MakeGateway, compile_gateway
from tests.gateway.test_forward_wire import gateway_for, routes
from tests.gateway.test_h1client import OK, Upstream, answering

FACTS = ("headers", "method", "version", "content", "remote", "scheme")
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
)


async def exchange_raw(client: GatewayClient, request: bytes, until_close: bool) -> bytes:
    """Send `request` on a new connection and read the answer: up to the end of a
    Content-Length or chunked body, or until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(), timeout=5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        if b"chunked" in head.lower():
            return head + await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), timeout=5)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), timeout=5)
    finally:
        writer.close()


def split(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, headers by lower-cased name, body) of a raw answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def test_a_chunked_answer_is_relayed_chunk_for_chunk_with_its_end(
    make_gateway: MakeGateway,
) -> None:
    async with Upstream(answering(CHUNKED)) as up:
        client = await gateway_for(make_gateway, up)
        answer = await exchange_raw(client, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", False)

    status, headers, body = split(answer)
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in headers
    # Every chunk the upstream's read held, the last one with the body's end.
    assert body in (b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n", b"7\r\nabcdefg\r\n0\r\n\r\n")
    assert len(headers[b"x-request-id"]) == 32
    assert b"date" in headers
    assert b"server" not in headers  # the upstream sent none: aiohttp's is never shown


async def test_an_http10_client_gets_an_unframed_body_and_then_the_connection_closes(
    make_gateway: MakeGateway,
) -> None:
    async with Upstream(answering(CHUNKED)) as up:
        client = await gateway_for(make_gateway, up)
        answer = await exchange_raw(client, b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n", True)

    status, headers, body = split(answer)
    assert status == b"HTTP/1.0 200 OK"
    assert b"transfer-encoding" not in headers  # HTTP/1.0 has no chunks: the end is the close
    assert body == b"abcdefg"


async def test_an_http10_keep_alive_client_keeps_its_connection_for_a_sized_answer(
    make_gateway: MakeGateway,
) -> None:
    async with Upstream(answering(OK)) as up:
        client = await gateway_for(make_gateway, up)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            for _ in range(2):  # the second request on the same connection is answered too
                writer.write(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
                status, headers, _ = split(head)
                assert status == b"HTTP/1.0 200 OK"
                assert headers[b"connection"] == b"keep-alive"
                assert await asyncio.wait_for(reader.readexactly(5), timeout=5) == b"hello"
        finally:
            writer.close()


async def test_a_head_answer_keeps_its_length_and_sends_no_body(
    make_gateway: MakeGateway,
) -> None:
    sized_head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    async with Upstream(answering(sized_head, OK)) as up:
        client = await gateway_for(make_gateway, up)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            assert split(head)[1][b"content-length"] == b"10"
            # What follows is the next answer's head, not ten bytes of a body.
            after = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            assert after.startswith(b"HTTP/1.1 200 OK")
            assert await asyncio.wait_for(reader.readexactly(5), timeout=5) == b"hello"
        finally:
            writer.close()


async def test_an_answer_bigger_than_one_write_arrives_byte_for_byte(
    make_gateway: MakeGateway,
) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB: beside the head by writelines, then in pieces
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    async with Upstream(answering(sized)) as up:
        client = await gateway_for(make_gateway, up)
        for _ in range(3):
            response = await client.get("/big")
            assert response.headers["Content-Length"] == str(len(body))
            assert await response.read() == body


async def test_requests_read_the_facts_aiohttps_properties_would(
    aiohttp_client: AiohttpClient,
) -> None:
    async with Upstream(answering(OK)) as up:
        app = create_app(compile_gateway(routes(up.url)))
        handle = app._handle
        facts: dict[str, tuple[object, object]] = {}

        async def watching(request: web.Request) -> web.StreamResponse:
            for name in FACTS:  # what the request holds, and what the property computes
                facts[name] = (
                    getattr(request, name),
                    getattr(web.BaseRequest, name).wrapped(request),
                )
            return await handle(request)

        app._handle = watching  # type: ignore[method-assign]
        client = await aiohttp_client(app)
        response = await client.post("/x?y=1", data=b"body", headers={"X-A": "1"})
        assert response.status == 200

    assert set(facts) == set(FACTS)
    for name, (held, computed) in facts.items():
        assert held == computed, name


async def test_a_line_that_cannot_be_made_costs_the_request_nothing(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = accesslog.access_line
    made: list[str] = []

    def failing(*args: Any) -> str:
        if args[5] == "/bad":  # the path: a bug in the line's making, for this request only
            raise ValueError("a bug")
        line = real(*args)
        made.append(line)
        return line

    async with Upstream(answering(OK)) as up:
        client = await gateway_for(make_gateway, up)
        server = client.server
        assert isinstance(server, GatewayTestServer)
        server.gateway.access_log.enabled = True  # tests/conftest.py quiets access lines
        monkeypatch.setattr(accesslog, "access_line", failing)
        bad = await client.get("/bad")
        good = await client.get("/good")

    assert (bad.status, good.status) == (200, 200)  # both answered
    assert [line for line in made if '"path":"/good"' in line]  # and the next line made
