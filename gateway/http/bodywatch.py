"""The watch on a request body on its way upstream: a client that goes silent, or trickles
slower than `limits.min_body_rate`, is cut off with a 408 so it cannot hold an upstream
connection (nginx's client_body_timeout, Apache mod_reqtimeout's MinRate).

Only the client is judged. When the upstream stops reading, the request's StreamReader fills
and aiohttp stops reading from the client, so no bytes arrive through nobody's fault but the
upstream's: an interval counts only when the gateway was waiting for client bytes at both of
its ends (nothing buffered, reading not paused). A slow upstream is the read timeout's
business, which starts once the body is sent.
"""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader

from gateway.http.errors import RequestTimeout
from gateway.http.exchange import Exchange


class BodyTimedOut(RequestTimeout, TimeoutError):
    """The 408, as the exception set on the request body. It is also a TimeoutError because
    aiohttp reads out what is left of a body after the answer and takes a TimeoutError there
    for a cut connection; any other exception it would log as "Unhandled exception"."""


class BodyWatch:
    """Cuts a request body off with a 408 when, over one `idle` interval, the client sends
    nothing, or fewer than `min_rate` bytes a second. One timer per request, re-armed every
    interval: nothing is done per chunk."""

    __slots__ = ("_content", "_exchange", "_handle", "_idle", "_least", "_seen", "_waiting")

    def __init__(
        self, content: StreamReader, idle: float, exchange: Exchange, min_rate: int = 0
    ) -> None:
        self._content, self._idle, self._exchange = content, idle, exchange
        self._least = max(1, int(min_rate * idle))  # bytes one interval must bring
        self._seen = content.total_bytes
        self._waiting = _waiting_for_client(content)
        self._handle = asyncio.get_running_loop().call_later(idle, self._check)

    def _check(self) -> None:
        content = self._content
        if content.is_eof():
            return  # the whole body arrived: a slow upstream is the read timeout's business
        waiting = _waiting_for_client(content)
        received = content.total_bytes - self._seen
        if waiting and self._waiting and received < self._least:
            detail = (
                f"no request body bytes arrived for {self._idle:g}s"
                if received == 0
                else f"the request body arrived slower than {self._least / self._idle:g} bytes/s"
            )
            error = BodyTimedOut(detail)
            self._exchange.body_error = error
            content.set_exception(error)  # the upstream request fails, and is not blamed
            return
        self._seen, self._waiting = content.total_bytes, waiting
        self._handle = asyncio.get_running_loop().call_later(self._idle, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


def _waiting_for_client(content: StreamReader) -> bool:
    """Is the gateway waiting for the client's bytes: none buffered, reading not paused?
    (aiohttp pauses reading when the buffer passes its high-water mark.)"""
    return content._size == 0 and not content._protocol._reading_paused
