"""`WholeResponse` (gateway/http/whole.py) against aiohttp's own `web.Response`, on real
sockets: for every method, status, body, header set, HTTP version and Connection header the
gateway can hand it, the client gets the same bytes (Date aside) and the connection the same
fate (kept for the next request, or closed)."""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Final

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.http.whole import WholeResponse

METHODS: Final = ("GET", "HEAD", "OPTIONS", "POST")
STATUSES: Final = (200, 204, 304, 404)
BODIES: Final = ("", "abc")
HEADER_SETS: Final = ("", "type", "type,length")  # none; Content-Type; and a Content-Length
DATE: Final = re.compile(rb"\r\nDate: [^\r]*")


async def answer(request: web.Request) -> web.StreamResponse:
    q = request.query
    status, body = int(q["status"]), q["body"].encode()
    headers = [("X-Case", "1")]
    if "type" in q["headers"]:
        headers.append(("Content-Type", "text/plain"))
    if "length" in q["headers"]:
        headers.append(("Content-Length", str(len(body))))
    if q["kind"] == "whole":
        return WholeResponse(status, None, headers, body)
    return web.Response(status=status, headers=headers, body=body)


@pytest.fixture
async def server(aiohttp_server: AiohttpServer) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return await aiohttp_server(app)


async def conversation(port: int, method: str, first: bytes) -> tuple[bytes, bytes]:
    """The answer to `first` (read by its own framing), then what a GET sent after it gets
    until the server closes: a second answer if the connection was kept, else nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        bodiless = method == "HEAD" or status in (204, 304) or length is None
        body = b"" if bodiless else await reader.readexactly(int(length[1]))  # type: ignore[index]
        writer.write(b"GET /x?kind=whole&status=200&body=end&headers= HTTP/1.1\r\nHost: t\r\n"
                     b"Connection: close\r\n\r\n")  # fmt: skip
        try:
            rest = await asyncio.wait_for(reader.read(-1), 5)
        except ConnectionResetError:  # closed with the second request unread
            rest = b""
        return DATE.sub(b"\r\nDate: -", head + body), DATE.sub(b"\r\nDate: -", rest)
    finally:
        writer.close()


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("connection", ["", "keep-alive", "close"])
async def test_a_whole_response_is_sent_as_web_response_sends_it(
    server: TestServer, version: str, connection: str
) -> None:
    assert server.port is not None
    said = f"Connection: {connection}\r\n" if connection else ""
    cases = itertools.product(METHODS, STATUSES, BODIES, HEADER_SETS)
    for method, status, body, headers in cases:
        target = f"/x?status={status}&body={body}&headers={headers}&kind="
        request = f"{method} {target}%s HTTP/{version}\r\nHost: t\r\n{said}\r\n"
        ours = await conversation(server.port, method, (request % "whole").encode())
        theirs = await conversation(server.port, method, (request % "web").encode())
        assert ours == theirs, (method, status, body, headers)
        assert ours[0].startswith(f"HTTP/{version} {status} ".encode())
        kept = (version == "1.1" and connection != "close") or connection == "keep-alive"
        assert ours[1].startswith(b"HTTP/1.1 200 OK\r\n") == kept
