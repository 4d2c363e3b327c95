"""The one relay: it writes what the pipeline produced to the client.

Head first, then body bytes as they arrive, counted for the access line. When the first body
bytes are already there (a small response usually comes in one read with its head), the
head goes out in the same write as they do, and when they are the whole body its end goes
with them too: one send instead of two or three. The limits a client can strain are held by
its connection (servers/connection.py): a client that stops reading stalls `write`, and
`send_timeout` ends it. An upstream that fails mid-body is a `ResponseAborted`: the client
must see a broken body, never one that looks complete.

A streamed answer is a `RelayedResponse`: aiohttp's StreamResponse with its own head and
body writes. Its head is what aiohttp would send (its framing, Date and Connection rules,
then the Exchange's edits, serialized by aiohttp's own C serializer, which refuses control
characters), made in one pass instead of aiohttp's chain of coroutines and signal, and its
body goes straight to the transport (a large chunk beside the head in one `writelines`, never
joined into a copy). It reads the internals aiohttp's own StreamWriter reads (the request's
writer and protocol: `tests/gateway/test_forward_wire.py` and the streaming tests hold it).
"""

from __future__ import annotations

from typing import Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.helpers import must_be_empty_body, should_remove_content_length
from aiohttp.http import HttpVersion11
from aiohttp.http_writer import StreamWriter, _serialize_headers
from aiohttp.web_protocol import RequestHandler

from gateway.http.errors import ClientFailure, ResponseAborted
from gateway.http.exchange import Exchange, apply_headers
from gateway.http.pipeline import UpstreamResponse
from gateway.http.whole import WholeResponse, add_server_headers

JOIN_BELOW: Final = 16384  # bytes: a head and a chunk this small are joined, else writelines
_LAST_CHUNK: Final = b"0\r\n\r\n"


class RelayedResponse(web.StreamResponse):
    """An upstream response on its way to the client (see the module docstring).

    `defer_head`: the head waits for the first body bytes (or the end) and goes out with
    them; otherwise it is sent by `prepare`, so a client sees it before a slow first byte."""

    def __init__(self, up: UpstreamResponse, exchange: Exchange, defer_head: bool) -> None:
        super().__init__(status=up.status, reason=up.reason, headers=up.headers)
        self._exchange = exchange
        self._defer_head = defer_head
        self._head: bytes | None = None  # made, not sent yet
        self._chunked_out = False  # the body goes out chunked (no Content-Length)
        self._remaining: int | None = None  # body bytes the Content-Length still allows
        self._protocol: RequestHandler | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        writer = self._payload_writer
        if writer is not None:  # aiohttp prepares what a handler returns: already done
            return writer
        self._req = request
        writer = self._payload_writer = request._payload_writer
        assert isinstance(writer, StreamWriter)
        self._protocol = request._protocol
        self._head = self._make_head(request)
        if not self._defer_head:
            self._send(b"")
        return writer

    def _make_head(self, request: web.BaseRequest) -> bytes:
        """aiohttp's StreamResponse._prepare_headers (no cookies, no compression), then the
        Exchange's edits (`apply_headers`, which the on_response_prepare hook applies to the
        gateway's other answers), serialized."""
        method, status, headers = request.method, self._status, self._headers
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        version = request.version
        self._must_be_empty_body = empty = must_be_empty_body(method, status)
        if empty:
            if hdrs.CONTENT_LENGTH in headers and should_remove_content_length(method, status):
                del headers[hdrs.CONTENT_LENGTH]
            if hdrs.TRANSFER_ENCODING in headers:
                del headers[hdrs.TRANSFER_ENCODING]
        else:
            declared = headers.get(hdrs.CONTENT_LENGTH)
            length = None if declared is None else int(declared)  # as self.content_length
            if length is None:
                if version >= HttpVersion11:
                    self._chunked_out = True
                    headers[hdrs.TRANSFER_ENCODING] = "chunked"
                else:  # HTTP/1.0 cannot chunk: the end of the connection ends the body
                    keep_alive = False
            else:
                self._remaining = length
            if length != 0:
                headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
        add_server_headers(headers, version, keep_alive)
        self._keep_alive = keep_alive
        apply_headers(self._exchange, headers)
        return _serialize_headers(
            f"HTTP/{version[0]}.{version[1]} {status} {self._reason}", headers
        )

    def _send(self, data: bytes, last: bool = False) -> None:
        """Write `data` (framed) after the head if that has not gone yet, and the body's end
        when `last`; raise ConnectionResetError when the client has gone."""
        if data:
            remaining = self._remaining
            if remaining is not None:
                if len(data) > remaining:  # never past the declared length (as aiohttp)
                    data = data[:remaining]
                self._remaining = remaining - len(data)
            elif self._must_be_empty_body:
                data = b""  # a HEAD, 204 or 304 answer carries no body, whatever came
        head = self._head
        if self._chunked_out:
            if data:
                end = b"\r\n0\r\n\r\n" if last else b"\r\n"
                parts: tuple[bytes, ...] = (b"%x\r\n" % len(data), data, end)
            else:
                parts = (_LAST_CHUNK,) if last else ()
            if head is not None:
                parts = (head, *parts)
        elif head is None:
            if not data:
                return
            parts = (data,)
        else:
            parts = (head, data) if data else (head,)
        if head is not None:
            self._head = None
        if parts:
            self._write(parts)

    def _write(self, parts: tuple[bytes, ...]) -> None:
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        if len(parts) == 1:
            size = len(parts[0])
            transport.write(parts[0])
        else:
            size = sum(map(len, parts))
            if size < JOIN_BELOW:
                transport.write(b"".join(parts))
            else:  # uvloop's writelines sends them together without joining them into a copy
                transport.writelines(parts)
        writer = self._payload_writer
        assert writer is not None
        writer.output_size += size  # what aiohttp's writer counts (handle_error reads it)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._payload_writer is None:
            raise RuntimeError("Cannot call write() before prepare()")
        self._send(bytes(data))
        protocol = self._protocol
        if protocol is not None and protocol._paused:  # the client is slow: wait for it
            await protocol._drain_helper()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        assert writer is not None, "Response has not been started"
        self._send(data, last=True)
        protocol = self._protocol
        if protocol is not None and protocol._paused and protocol.transport is not None:
            await protocol._drain_helper()
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None
        self._protocol = None


async def relay(
    request: web.Request, exchange: Exchange, up: UpstreamResponse
) -> web.StreamResponse:
    """Write `up` to the client; what its body holds is released in every case."""
    body = up.body
    try:
        if isinstance(body, bytes):  # made whole by the gateway (a preflight, a cache hit)
            return WholeResponse(up.status, up.reason, up.headers, body)
        buffered = getattr(body, "buffered", None)  # the upstream client's: bytes waiting
        waiting = buffered is not None and buffered() > 0
        response = RelayedResponse(up, exchange, defer_head=waiting)
        await response.prepare(request)
        # Every body byte has come already (a small response): the last chunk carries the end.
        left = buffered if waiting and getattr(body, "complete", False) else None
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
            if left is not None and not left():  # nothing left after this chunk: end with it
                await response.write_eof(chunk)
                return response
            await response.write(chunk)  # a client that left raises here, quietly
        await response.write_eof()
        return response
    finally:
        if up.release is not None:
            up.release()
