"""TEMPORARY: the innermost handler of a route with request/response-phase stages (the cache),
in the closure style the pipeline has today. It goes away when the phase pipeline lands: the
cache stage is then listed in `build_chain` like any other stage, and this file is deleted.

Order: each stage's `on_request` (one may answer), else the upstream; then each stage's
`on_response` innermost first (or `on_error` when the upstream failed: one may answer); then
the relay, headers first and bytes as they arrive, as `forward_handler` does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from gateway.actions.forward import forward_handler, upstream_headers, upstream_path
from gateway.actions.websocket import is_websocket
from gateway.config.model import DEFAULT_MAX_MESSAGE_BYTES, RouteConfig
from gateway.http.bodywatch import BodyWatch
from gateway.http.errors import ResponseAborted, UpstreamError, UpstreamUnavailable
from gateway.http.exchange import EXCHANGE, Exchange
from gateway.http.hopbyhop import relayed
from gateway.http.pipeline import Handler
from gateway.stages.cache import UpstreamResponse
from gateway.upstream.service import Service, client_timeout


class PhaseStage(Protocol):
    async def on_request(
        self, exchange: Exchange, request: web.BaseRequest
    ) -> UpstreamResponse | None: ...

    async def on_response(self, exchange: Exchange, up: UpstreamResponse) -> UpstreamResponse: ...


async def _read(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    while chunk := await content.readany():
        yield chunk


def phased_handler(
    route: RouteConfig,
    service: Service,
    phases: Sequence[PhaseStage],
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Handler:
    websocket = forward_handler(route, service, max_message_bytes)
    timeout = None if route.timeouts == service.config.timeouts else client_timeout(route.timeouts)
    idle = route.timeouts.read

    async def handle(request: web.Request) -> web.StreamResponse:
        if is_websocket(request):
            return await websocket(request)
        exchange = request[EXCHANGE]
        up: UpstreamResponse | None = None
        for stage in phases:
            up = await stage.on_request(exchange, request)
            if up is not None:
                break
        release = None
        if up is None:
            body = exchange.body
            if body is None and request.body_exists:
                body = request.content
            watch = (
                None
                if body is None or idle is None
                else BodyWatch(request.content, idle, exchange, route.min_body_rate)
            )
            started = time.perf_counter()
            try:
                headers = upstream_headers(request, exchange, route)
                reply = await service.send(
                    request.method, upstream_path(route, exchange), headers, body, exchange, timeout
                )
            except UpstreamError as exc:
                for stage in reversed(phases):
                    on_error = getattr(stage, "on_error", None)
                    up = None if on_error is None else await on_error(exchange, exc)
                    if up is not None:
                        break
                if up is None:
                    raise
            else:
                exchange.upstream_ms = (time.perf_counter() - started) * 1000
                upstream = reply.response
                release = reply.release
                if upstream.status == 101:
                    reply.release()
                    raise UpstreamUnavailable(
                        f"service {service.name!r} switched protocols unasked"
                    )
                up = UpstreamResponse(
                    upstream.status,
                    upstream.reason or "",
                    CIMultiDict(relayed(upstream.headers)),
                    _read(upstream.content),
                )
                exchange.from_upstream = True
                exchange.upstream_had_type = hdrs.CONTENT_TYPE in upstream.headers
                exchange.upstream_had_server = hdrs.SERVER in upstream.headers
                for stage in reversed(phases):
                    up = await stage.on_response(exchange, up)
            finally:
                if watch is not None:
                    watch.cancel()
        else:
            exchange.from_upstream = True  # an entry holds the upstream's own headers
            exchange.upstream_had_type = hdrs.CONTENT_TYPE in up.headers
            exchange.upstream_had_server = hdrs.SERVER in up.headers
        try:
            response = web.StreamResponse(status=up.status, reason=up.reason, headers=up.headers)
            await response.prepare(request)
            chunks = up.body
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except (aiohttp.ClientError, TimeoutError) as exc:  # the upstream's fault
                    raise ResponseAborted(exchange.service, response) from exc
                exchange.bytes_out += len(chunk)
                await response.write(chunk)  # a client that left raises here, quietly
            await response.write_eof()
            return response
        finally:
            close = getattr(up.body, "aclose", None)
            if close is not None:
                await close()
            if release is not None:
                release()

    return handle
