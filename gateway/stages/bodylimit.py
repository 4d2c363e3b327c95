"""Request body limits: 413 by Content-Length before any upstream is called; a chunked body is
cut off the moment it passes the limit, so the upstream never receives a complete body."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader, web

from gateway.http.errors import PayloadTooLarge
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Answer


class BodyLimitStage:
    """Request phase only: a Content-Length over the limit is refused before `100 Continue`;
    a body without one is wrapped so that it fails as soon as it passes the limit."""

    __slots__ = ("detail", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.detail = f"the request body is larger than this route's limit of {limit} bytes"

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        length = request.content_length
        if length is not None:
            if length > self.limit:
                raise PayloadTooLarge(self.detail)
        elif request.body_exists:
            exchange.body = _capped(request.content, self.limit, exchange, self.detail)
        return None

    def without_body(self, exchange: Exchange) -> None:
        """The request phase of a request without a body (the hit lane's): nothing to limit."""


def body_limit_stage(limit: int | None) -> BodyLimitStage | None:
    return None if limit is None else BodyLimitStage(limit)


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
