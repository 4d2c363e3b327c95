"""The one relay: it writes what the pipeline produced to the client.

Head first, then body bytes as they arrive, counted for the access line. When the first body
bytes are already there (a small response usually comes in one read with its head), the
head goes out in the same write as they do: one send instead of two. The limits a client
can strain are held by its connection (servers/connection.py): a client that stops reading
stalls `response.write`, and `send_timeout` ends it. An upstream that fails mid-body is a
`ResponseAborted`: the client must see a broken body, never one that looks complete.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from gateway.http.errors import ClientFailure, ResponseAborted
from gateway.http.exchange import Exchange, apply_headers
from gateway.http.pipeline import UpstreamResponse


class _Relayed(web.StreamResponse):
    """A streamed response that applies its Exchange's header edits itself, just before its
    head is serialized: what the app's on_response_prepare hook (`apply_exchange`) does for
    the gateway's other answers, without the signal dispatch, a coroutine and a lookup of
    the Exchange per response."""

    _exchange: Exchange

    async def _start(self, request: web.BaseRequest) -> AbstractStreamWriter:
        # aiohttp's StreamResponse._start, with `apply_headers` for `request._prepare_hook`.
        self._req = request
        writer = self._payload_writer = request._payload_writer
        await self._prepare_headers()
        apply_headers(self._exchange, self._headers)
        await self._write_headers()
        return writer


class _HeadWithBody(_Relayed):
    """A relayed response whose head waits for the first body write (or the end) and goes
    out with it: aiohttp's own web.Response does so too."""

    _send_headers_immediately = False


async def relay(
    request: web.Request, exchange: Exchange, up: UpstreamResponse
) -> web.StreamResponse:
    """Write `up` to the client; what its body holds is released in every case."""
    body = up.body
    try:
        if isinstance(body, bytes):  # made whole by the gateway (a preflight, a cache hit)
            return web.Response(status=up.status, reason=up.reason, headers=up.headers, body=body)
        buffered = getattr(body, "buffered", None)  # the upstream client's: bytes waiting
        kind = _HeadWithBody if buffered is not None and buffered() else _Relayed
        response = kind(status=up.status, reason=up.reason, headers=up.headers)
        response._exchange = exchange
        await response.prepare(request)
        while True:
            try:
                chunk = await body.readany()
            except (ClientFailure, aiohttp.ClientError, TimeoutError) as exc:  # the upstream's
                if up.call is not None:
                    up.call.outcome = "aborted"
                raise ResponseAborted(exchange.service, response) from exc
            if not chunk:
                break
            exchange.bytes_out += len(chunk)
            await response.write(chunk)  # a client that left raises here, quietly
        await response.write_eof()
        return response
    finally:
        if up.release is not None:
            up.release()
