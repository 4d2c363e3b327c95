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

from gateway.http.errors import ClientFailure, ResponseAborted
from gateway.http.exchange import Exchange
from gateway.http.pipeline import UpstreamResponse
from gateway.http.whole import WholeResponse


class _HeadWithBody(web.StreamResponse):
    """A streamed response whose head waits for the first body write (or the end) and goes
    out with it: aiohttp's own web.Response does so too. `prepare` still runs every
    on_response_prepare handler (apply_exchange) at once."""

    _send_headers_immediately = False


async def relay(
    request: web.Request, exchange: Exchange, up: UpstreamResponse
) -> web.StreamResponse:
    """Write `up` to the client; what its body holds is released in every case."""
    body = up.body
    try:
        if isinstance(body, bytes):  # made whole by the gateway (a preflight, a cache hit)
            return WholeResponse(up.status, up.reason, up.headers, body)
        buffered = getattr(body, "buffered", None)  # the upstream client's: bytes waiting
        kind = _HeadWithBody if buffered is not None and buffered() else web.StreamResponse
        response = kind(status=up.status, reason=up.reason, headers=up.headers)
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
