"""Purpose-built upstream apps for gateway tests: each answers so a test can assert what the
upstream received (echo) or makes one failure happen on demand."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

GZIP_BODY = gzip.compress(b'{"compressed": true}' * 50, mtime=0)


async def echo(request: web.Request) -> web.StreamResponse:
    """The method, raw path, headers and body length the upstream saw."""
    body = await request.read()
    seen = {
        "method": request.method,
        "path_qs": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_length": len(body),
        "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
    }
    response = web.json_response(seen)
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    if "X-Echo-Connection" in request.headers:
        response.headers["Connection"] = request.headers["X-Echo-Connection"]
        response.headers["X-Hop"] = "secret"
    return response


def make_echo_app() -> web.Application:
    app = web.Application(client_max_size=2**31)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def gzip_body(request: web.Request) -> web.Response:
    return web.Response(
        body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def stream(request: web.Request) -> web.StreamResponse:
    """`?mib=N` MiB of bytes in 64 KiB chunks."""
    mib = int(request.query.get("mib", "1"))
    response = web.StreamResponse()
    response.content_length = mib * 2**20
    await response.prepare(request)
    chunk = b"x" * 65536
    for _ in range(0 if request.method == "HEAD" else mib * 16):
        await response.write(chunk)
    await response.write_eof()
    return response


async def broken(request: web.Request) -> web.StreamResponse:
    """Promises 1 MiB, sends 64 KiB, then drops the connection."""
    response = web.StreamResponse()
    response.content_length = 2**20
    await response.prepare(request)
    await response.write(b"y" * 65536)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return response


async def reset(request: web.Request) -> web.StreamResponse:
    """Closes the connection without answering."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


def make_slow(
    delay: float, started: asyncio.Event | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def slow(request: web.Request) -> web.StreamResponse:
        if started is not None:
            started.set()
        await asyncio.sleep(delay)
        return web.json_response({"slow": True})

    return slow


async def sse(request: web.Request) -> web.StreamResponse:
    """Three events, the next one only after the client could have seen the last."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(3):
        await response.write(f"data: {json.dumps({'n': i})}\n\n".encode())
        await asyncio.sleep(0.2)
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=["chat"])
    await ws.prepare(request)
    async for message in ws:
        if message.type == web.WSMsgType.TEXT and message.data == "close":
            await ws.close(code=4000, message=b"bye")
        elif message.type == web.WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
        elif message.type == web.WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


def make_tools_app(slow_delay: float = 5.0) -> web.Application:
    """gzip, stream, broken, reset, slow, sse and ws endpoints on one server."""
    app = web.Application()
    app.router.add_get("/gzip", gzip_body)
    app.router.add_get("/stream", stream)
    app.router.add_get("/broken", broken)
    app.router.add_route("*", "/reset", reset)
    app.router.add_get("/slow", make_slow(slow_delay))
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", websocket)
    return app


def make_gated_app(gate: asyncio.Event) -> web.Application:
    """Answers every GET only once `gate` is set: a request a test can hold in flight."""

    async def gated(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="released")

    app = web.Application()
    app.router.add_get("/{tail:.*}", gated)
    return app


def make_late_reader_app(delay: float) -> web.Application:
    """Reads no request body for `delay` seconds (a busy upstream), then all of it; answers
    with the length it got."""

    async def late(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response({"received": len(await request.read())})

    app = web.Application(client_max_size=2**31)
    app.router.add_route("*", "/{tail:.*}", late)
    return app


def make_held_stream_app(gate: asyncio.Event) -> web.Application:
    """GET /events: one server-sent event at once, the last one only once `gate` is set."""

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await gate.wait()
        await response.write(b"data: last\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    app.router.add_get("/ws", websocket)
    return app
