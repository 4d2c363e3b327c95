"""Request body limits: 413 by Content-Length before any upstream is called; a chunked body is
cut off the moment it passes the limit, so the upstream never receives a complete body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import StreamReader, web

from gateway.http.errors import PayloadTooLarge
from gateway.http.exchange import EXCHANGE, Exchange

if TYPE_CHECKING:
    from gateway.http.pipeline import Handler, Stage


def body_limit_stage(limit: int | None) -> Stage | None:
    if limit is None:
        return None
    detail = f"the request body is larger than this route's limit of {limit} bytes"

    def wrap(next_handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            length = request.content_length
            if length is not None:
                if length > limit:
                    raise PayloadTooLarge(detail)
            elif request.body_exists:
                exchange = request[EXCHANGE]
                exchange.body = _capped(request.content, limit, exchange, detail)
            return await next_handler(request)

        return handle

    return wrap


async def _capped(
    content: StreamReader, limit: int, exchange: Exchange, detail: str
) -> AsyncIterator[bytes]:
    seen = 0
    while chunk := await content.readany():
        seen += len(chunk)
        if seen > limit:
            exchange.body_error = PayloadTooLarge(detail)
            raise exchange.body_error
        yield chunk
