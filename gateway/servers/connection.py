"""One client connection: the limits nginx has by default, and answers to what the parser rejects.

aiohttp's `RequestHandler` (the asyncio protocol of one connection) is subclassed to add what
it lacks for a server on the open internet (CONTRACT §7):

- `header_timeout`: a request's headers must arrive within it, counted from the connection's
  start or from the first byte of the next request (slowloris); then the connection closes.
- `keepalive_timeout`: aiohttp's own idle timer, set from the config instead of its 3630 s.
- `send_timeout`: a client that stops reading makes the transport pause writing; if it stays
  paused that long, the connection is aborted and its handler cancelled, which releases the
  upstream connection. Nothing is done per write: the timer is armed on pause only.
- `max_header_bytes`: all header lines of one request together (`name: value` and CRLF, the
  request line apart). Bytes are counted as they arrive, so a head that never ends costs at
  most that plus the request line and one read before it is refused with 431; a head that
  arrived whole is measured exactly, and only when its read was that large.
- `max_client_connections`: connections over it are closed at once.

While the connection's loop is idle, parsed requests are first offered to the hit lane
(servers/hitlane.py), which answers a fresh cache hit at once, in order, and leaves the rest to
aiohttp's loop.

A request the parser rejects gets the gateway's problem+json (400, 414 or 431) with no Server
header and no echo of the request's bytes, is counted and access-logged, and the connection
closes. The event log gets one line per interval, however many arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, EmptyStreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from gateway.config.model import ClientLimits
from gateway.http.errors import (
    GatewayError,
    HeadersTooLarge,
    MalformedRequest,
    TargetTooLong,
    problem_response,
)
from gateway.http.exchange import EXCHANGE, start_exchange
from gateway.servers.hitlane import HitLane, lane_ready
from gateway.servers.public import remote_text

if TYPE_CHECKING:
    from gateway.runtime.state import Gateway

logger = logging.getLogger("gateway.connection")
_REQUEST_LINE_EXTRA: Final = 64  # method, version, spaces and CRLFs beside the target
REJECTION_LOG_INTERVAL: Final = 10.0  # seconds between two event-log lines about rejections


class HeadTooLarge(BadHttpMessage):
    """The header lines of one request passed `max_header_bytes` before they ended."""


class GatewayServer(web.Server):
    """aiohttp's connection factory, making `GatewayProtocol`s with the current limits."""

    def __init__(self, server: web.Server, gateway: Gateway) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **server._kwargs,
        )
        self.gateway = gateway
        self.lane: HitLane | None = None  # set by GatewayRunner for the public app
        self.open = 0  # client connections open now
        self._rejections = 0  # parser rejections since the last event-log line
        self._logged_at = -REJECTION_LOG_INTERVAL

    def __call__(self) -> GatewayProtocol:
        limits = self.gateway.config.client_limits  # read per connection: reloads apply
        kwargs = dict(self._kwargs)
        kwargs.update(
            keepalive_timeout=limits.keepalive_timeout,
            max_line_size=limits.max_request_target_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
        )
        return GatewayProtocol(self, limits, loop=self._loop, **kwargs)

    def rejected(self) -> None:
        """Count a parser rejection; log a line at most once per interval."""
        self._rejections += 1
        now = time.monotonic()
        if now - self._logged_at >= REJECTION_LOG_INTERVAL:
            logger.info("malformed requests refused: %d since the last report", self._rejections)
            self._rejections, self._logged_at = 0, now


class GatewayProtocol(RequestHandler):
    __slots__ = ("_answered", "_counted", "_head_bytes", "_head_timer", "_lane", "_lane_turn",
                 "_limits", "_payload", "_remote", "_send_timer")  # fmt: skip

    def __init__(self, server: GatewayServer, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._limits = limits
        self._counted = False  # this connection is in the server's `open` count
        self._head_bytes = 0  # bytes of the request head being received
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._payload: Any = None  # the body of the last request parsed, while it arrives
        self._lane = server.lane
        # Requests taken from the queue (by start() or the lane) when the last of them was
        # answered, on a connection that goes on; -1: it does not (servers/hitlane.py).
        self._answered = 0
        self._remote: str | None = None  # the peer, as requests name it (for the lane)
        # The lane's next turn at a pipelined flood, when one queue's worth was answered.
        self._lane_turn: asyncio.Handle | None = None

    @property
    def _server(self) -> GatewayServer:
        manager = self._manager
        assert isinstance(manager, GatewayServer)
        return manager

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.open >= self._limits.max_client_connections:
            server.gateway.metrics.client_closed.labels("over_limit").inc()
            self._manager = None  # never registered: connection_lost has nothing to undo
            transport.close()
            return
        server.open += 1
        self._counted = True
        super().connection_made(transport)
        self._arm_head_timer()
        if self._lane is not None:
            peer = self.peername
            if peer is None:
                self._lane = None
            else:
                self._remote = remote_text(peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.open -= 1
        for timer in (self._head_timer, self._send_timer, self._lane_turn):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = self._lane_turn = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None:  # WebSocket frames
            super().data_received(data)
            return
        waiter = self._waiter
        if waiter is None:
            last = self._payload
            if (
                self._lane is None
                or self._messages
                or self._request_in_progress
                or self._answered != self._request_count  # start() took one since
                or not (last is None or type(last) is EmptyStreamReader or last.is_eof())
            ):
                self._receive(data)
                return
            # start() is between the response it finished and its next wait (or not started
            # yet): it takes what the lane leaves in the queue when it resumes.
            self._receive(data)
            if self._messages and not self._close and not self._force_close:
                self._serve_lane()
            return
        if self._lane is None or waiter.done():
            self._receive(data)
            return
        # start() is idle, waiting for a request: hidden from aiohttp while the heads that
        # arrive are parsed, so the lane may answer the first ones itself (servers/hitlane.py).
        self._serve_hidden(waiter, data)

    def _serve_hidden(self, waiter: asyncio.Future[None], data: bytes) -> None:
        """Receive `data` and let the lane answer from the queue while start() waits on
        `waiter`, hidden from aiohttp meanwhile; then wake start() for what is left."""
        self._waiter = None
        try:
            if data:
                self._receive(data)
            if self._messages and not self._close and not self._force_close:
                self._serve_lane()
        finally:
            self._waiter = waiter
        if self._force_close:  # what force_close() or close() would have done to it
            waiter.cancel()
        elif self._messages:  # start() answers the rest, in order (or the lane, next turn)
            if self._lane_turn is None and not waiter.done():
                waiter.set_result(None)
        elif self._close:
            waiter.cancel()

    def _next_lane_turn(self) -> None:
        """The lane's next queue's worth of a pipelined flood, while start() still waits
        (when it does not, it answers the rest itself)."""
        self._lane_turn = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._serve_hidden(waiter, b"")

    def log_access(
        self, request: BaseRequest, response: StreamResponse, time: float | None
    ) -> None:
        """finish_response's last step, once the response is sent (or the client left, when
        the transport is gone): every request start() took is answered, and the connection
        goes on unless this one said no. The lane may answer what arrives before start() waits
        again (data_received)."""
        if response.keep_alive and not self._close:
            self._answered = self._request_count - len(self._messages)
        else:
            self._answered = -1
        if self._logging_enabled:  # never in production: aiohttp's access log is off
            super().log_access(request, response, time)

    def _serve_lane(self) -> None:
        """Answer queued requests from the front while the lane has their answers: what
        start() does around a response, without a Task or a request object."""
        lane, remote, messages, transport = self._lane, self._remote, self._messages, self.transport
        assert lane is not None
        assert remote is not None
        answered = False
        keep_alive = True
        server = self._manager
        assert server is not None
        # A client that stops reading, or is gone, is left to start(): it waits, or gives up.
        # At most a queue's worth per call (reading resumes below as the queue drains, so a
        # pipelined flood would refill it without end): the rest waits for the lane's next
        # turn of the event loop, and other connections run meanwhile.
        budget = self._max_msg_queue_size
        while messages and not self._paused and transport is not None and budget:
            budget -= 1
            message, payload = messages[0]
            if payload is not EMPTY_PAYLOAD or type(message) is not RawRequestMessage:
                break
            if transport.is_closing():
                break
            try:
                wire = lane.answer(message, remote)
            except Exception:  # a bug: the dispatcher answers it, as if the lane had not asked
                logger.exception("the hit lane failed; the request goes to the dispatcher")
                wire = None
            if wire is None:
                break
            messages.popleft()
            if self._parser is not None:
                self._parser.message_consumed()
            server.requests_count += 1
            transport.write(wire)
            answered = True
            keep_alive = self._keepalive = not message.should_close
            if not keep_alive:
                break
            if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()  # parses what the queue held back
        if not answered:
            return
        if not budget and messages and keep_alive and self._lane_turn is None:
            self._lane_turn = self._loop.call_soon(self._next_lane_turn)
        self._answered = self._request_count - len(messages) if keep_alive else -1
        if not keep_alive:  # start() would leave its loop and close: it is ended with it
            self.force_close()
        elif not self._close and not self._force_close:  # start()'s keep-alive timer
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _receive(self, data: bytes) -> None:
        """aiohttp's data_received, with the head limits and the header timeout."""
        before = self._request_count
        payload = self._payload  # the last request's body: bytes now are a body's, or a head
        in_head = payload is None or type(payload) is EmptyStreamReader or payload.is_eof()
        limit = self._limits.max_header_bytes
        suspect = in_head and self._head_bytes + len(data) > limit  # the headers may be over
        super().data_received(data)
        if self._request_count != before:  # a head ended: its body (if any) follows
            self._head_bytes = 0
            self._payload = self._messages[-1][1] if self._messages else None
            if (timer := self._head_timer) is not None:  # _cancel_head_timer, inline
                timer.cancel()
                self._head_timer = None
            if suspect:  # only then can a head that arrived whole be over the total
                self._check_heads(self._request_count - before, limit)
            return
        if not in_head or not data or self._force_close or self._close:
            return
        self._head_bytes += len(data)
        if self._head_bytes > limit + self._limits.max_request_target_bytes + _REQUEST_LINE_EXTRA:
            self._refuse(HeadTooLarge("request headers too large"))
        elif self._head_timer is None:
            self._arm_head_timer()

    def _check_heads(self, count: int, limit: int) -> None:
        """Refuse the first of the `count` heads just parsed whose lines exceed `limit`."""
        queued = self._messages
        for i in range(len(queued) - count, len(queued)):
            message = queued[i][0]
            if isinstance(message, _ErrInfo):
                continue
            size = sum(len(name) + len(value) + 4 for name, value in message.raw_headers)
            if size > limit:
                while len(queued) > i:  # it and what was pipelined after it
                    queued.pop()
                self._refuse(HeadTooLarge("request headers too large"))
                return

    def _refuse(self, exc: HttpProcessingError) -> None:
        """Answer the head being received with an error, as aiohttp does for parser errors,
        and read nothing more from this connection."""
        self._messages.append((_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD))
        self._request_count += 1
        self._close = True  # data_received ignores what follows; closed after the answer
        self._cancel_head_timer()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_head_timer(self) -> None:
        timeout = self._limits.header_timeout
        if timeout > 0:
            self._head_timer = self._loop.call_later(timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._request_in_progress:  # a pipelined head waits for the request before it
            self._arm_head_timer()
            return
        self._server.gateway.metrics.client_closed.labels("header_timeout").inc()
        self.force_close()

    def pause_writing(self) -> None:
        super().pause_writing()
        timeout = self._limits.send_timeout
        if timeout > 0 and self._send_timer is None:
            self._send_timer = self._loop.call_later(timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self._server.gateway.metrics.client_closed.labels("send_timeout").inc()
        if self.transport is not None:
            self.transport.abort()  # buffered bytes are dropped: the client was not reading

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """A parser rejection (or a bug that escaped the dispatcher) as problem+json."""
        server = self._server
        if request.writer.output_size > 0:  # something was sent: only a broken end is left
            raise ConnectionError("response already started")
        error = rejection(exc, self._limits) if status == 400 else GatewayError()
        if status != 400:
            logger.error("error outside the dispatcher", exc_info=exc)
        exchange = start_exchange(request)
        request[EXCHANGE] = exchange
        response = problem_response(request, error)
        response.force_close()
        server.rejected()
        gateway = server.gateway
        sent = response.content_length or 0
        gateway.metrics.observe(exchange, "OTHER", error.status, 0, sent, 0.0)
        gateway.access_log.record(request, exchange, error.status, 0, sent, 0.0)
        return response


def rejection(exc: BaseException | None, limits: ClientLimits) -> GatewayError:
    """The problem for what aiohttp's parser (or the head counter) refused. The parser's own
    message is never shown: it quotes the request's bytes, credentials included."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == limits.max_request_target_bytes and limit != limits.max_header_bytes:
            return TargetTooLong(f"the request target is longer than {limit} bytes")
        return HeadersTooLarge(f"a request header is longer than {limits.max_header_bytes} bytes")
    if isinstance(exc, HeadTooLarge):
        return HeadersTooLarge(f"the request headers exceed {limits.max_header_bytes} bytes")
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return HeadersTooLarge(f"the request has more than {limits.max_headers} header fields")
    return MalformedRequest("the request could not be parsed as HTTP/1.1")


class GatewayRunner(web.AppRunner):
    """AppRunner whose connections are `GatewayProtocol`s (the public listener's runner)."""

    def __init__(self, app: web.Application, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._gateway = gateway

    async def _make_server(self) -> web.Server:
        server = GatewayServer(await super()._make_server(), self._gateway)
        if lane_ready(self.app):
            server.lane = HitLane(self._gateway)
        return server
