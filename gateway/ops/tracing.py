"""OpenTelemetry traces (`tracing:`, off by default): one server span per request, named for
its route, and one client span per upstream call (the forward, auth sub-requests, and later
aggregate parts and compose calls), exported by the SDK's BatchSpanProcessor and OTLP/HTTP
exporter from their own thread.

Nothing is timed twice. The spans are built after the request, at the end of dispatch, from
what the Exchange recorded (its start; each UpstreamCall's start, time to response head,
target label, attempts and status), with explicit timestamps. So a request costs the tracer
nothing until it ends, and an unsampled one almost nothing at all.

Propagation (W3C Trace Context). `start_exchange` keeps a valid incoming traceparent or begins
a trace. `Tracer.begin` then takes the decision the SDK's ParentBased(TraceIdRatioBased) sampler
will take when the spans are built (a remote parent's sampled flag; else the trace id's low 64
bits against the ratio's bound), and, for a sampled request, picks the server span's id and the
forward call's: the traceparent sent upstream names that client span, so upstream services join
the trace as its children. The incoming context (with any tracestate) is read by the SDK's
TraceContext propagator; the ids picked early reach the SDK through `_ChosenIds`.

Export never waits on the request path: spans queue (bounded) for the processor's thread; when
the queue is full (a collector down or slow) a span is dropped and counted
(gateway_trace_spans_dropped_total) rather than logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from aiohttp import web
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config.model import RouteConfig, TracingConfig
from gateway.http.exchange import TRACEPARENT, Exchange, TraceSpans, UpstreamCall, random_hex

MAX_QUEUE: Final = 2048  # spans waiting for export; past this they are dropped and counted
BATCH: Final = 512  # spans per export request
SCHEDULE_MS: Final = 1000  # the processor sends what it has at least this often
EXPORT_TIMEOUT: Final = 5.0  # seconds one export (its retries included) may take
FLUSH_TIMEOUT: Final = 3.0  # seconds shutdown waits for the last spans to be sent
_UPSTREAM_KINDS: Final = frozenset({"forward", "websocket"})  # calls sent `exchange.traceparent`
_METHODS: Final = {"auth": "GET"}  # call kinds whose method is not the client's
_propagator: Final = TraceContextTextMapPropagator()
# The processor's own "Queue full" warning: never reached (a full queue is counted here
# first), and one log line per span would be the slowest possible way to drop it.
logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


class _ChosenIds(IdGenerator):
    """The SDK's ids, except the ones the gateway chose before the span existed (they were
    sent upstream already): each is set just before `start_span` and used once."""

    def __init__(self) -> None:
        self.span_id = 0
        self.trace_id = 0

    def generate_span_id(self) -> int:
        chosen, self.span_id = self.span_id, 0
        return chosen or random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        chosen, self.trace_id = self.trace_id, 0
        return chosen or random.getrandbits(128) or 1


class CountingProcessor(BatchSpanProcessor):
    """BatchSpanProcessor with a bounded queue whose overflow is counted, not logged (the
    SDK drops silently but for a warning per span)."""

    def __init__(
        self,
        exporter: SpanExporter,
        on_drop: Callable[[], None],
        max_queue_size: int = MAX_QUEUE,
        schedule_delay_millis: float = SCHEDULE_MS,
    ) -> None:
        super().__init__(
            exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=min(BATCH, max_queue_size),
            schedule_delay_millis=schedule_delay_millis,
        )
        # The processor's deque (its length is the only way to see it is full);
        # tests/gateway/test_tracing.py checks the drops are counted.
        self._queue: Sequence[object] = self._batch_processor._queue
        self._limit = max_queue_size
        self._on_drop = on_drop

    def on_end(self, span: ReadableSpan) -> None:
        if len(self._queue) >= self._limit:
            self._on_drop()
            return
        super().on_end(span)

    def shutdown_within(self, seconds: float) -> None:
        """Send what is queued, for `seconds` at most, then stop the exporter (which ends its
        retries). Blocking: call it off the loop. (The public `shutdown` waits 30 s.)"""
        self._batch_processor.shutdown(timeout_millis=int(seconds * 1000))


class Tracer:
    """The spans of every request of this process, and their export."""

    def __init__(
        self,
        config: TracingConfig,
        routes: Callable[[], Sequence[RouteConfig]],
        on_drop: Callable[[], None],
        exporter: SpanExporter | None = None,
        max_queue_size: int | None = None,  # default MAX_QUEUE
    ) -> None:
        self._routes = routes  # the current table's routes (for `http.route`)
        self._seen: Sequence[RouteConfig] = ()
        self._prefixes: dict[str, str] = {}
        self._bound = TraceIdRatioBased.get_bound_for_rate(config.sample_ratio)
        self._ids = _ChosenIds()
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=Resource({"service.name": config.service_name}),  # no detectors: no I/O
            id_generator=self._ids,
        )
        if exporter is None:
            exporter = OTLPSpanExporter(config.otlp_endpoint, timeout=EXPORT_TIMEOUT)
        self._processor = CountingProcessor(
            exporter, on_drop, max_queue_size=max_queue_size or MAX_QUEUE
        )
        self.provider.add_span_processor(self._processor)
        self._tracer = self.provider.get_tracer("gateway")

    def begin(self, exchange: Exchange, request: web.BaseRequest) -> None:
        """Decide sampling; for a sampled request choose its span ids and put the forward
        call's in the traceparent that goes upstream. Runs before anything is sent."""
        header = exchange.traceparent
        if request.headers.get(TRACEPARENT) == header:  # a valid one came: its flag decides
            if not int(header[53:55], 16) & 1:
                return  # passed on as it came, unsampled
            parent = header[36:52]
        elif int(header[19:35], 16) < self._bound:  # begun here: the trace id decides
            parent = ""
        else:
            exchange.traceparent = header[:53] + "00"  # tell upstream it is not recorded
            return
        upstream = random_hex(16)
        exchange.trace = TraceSpans(parent, random_hex(16), upstream)
        exchange.traceparent = f"00-{header[3:35]}-{upstream}-01"

    def record(self, request: web.BaseRequest, exchange: Exchange, status: int) -> None:
        """The request's spans, from its Exchange (at the end of dispatch)."""
        spans = exchange.trace
        if spans is None:
            return
        now_ns, now = time.time_ns(), time.perf_counter()

        def ns(at: float) -> int:
            return now_ns - int((now - at) * 1e9)

        ids = self._ids
        context: Context | None = None
        if spans.parent:  # the caller's span, with its tracestate, from the propagator
            context = _propagator.extract(request.headers)
        ids.trace_id = int(exchange.trace_id, 16)  # used if the span is a root (begun here)
        method = request.method
        route = self._prefix(exchange.route)
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": exchange.path,
            "url.scheme": request.scheme,
            "client.address": exchange.client,
            "http.response.status_code": status,
            "gateway.request_id": exchange.request_id,
        }
        if route is not None:
            attributes["http.route"] = route
            attributes["gateway.route"] = exchange.route
        ids.span_id = int(spans.server, 16)
        server = self._tracer.start_span(
            f"{method} {route}" if route is not None else method,
            context,
            SpanKind.SERVER,
            attributes,
            start_time=ns(exchange.started),
        )
        ids.trace_id = 0
        if status >= 500:
            server.set_attribute("error.type", str(status))
            server.set_status(Status(StatusCode.ERROR))
        end = ns(now)
        if exchange.calls:
            parent = set_span_in_context(server)
            upstream_id = int(spans.upstream, 16)
            for call in exchange.calls:
                if call.kind in _UPSTREAM_KINDS and upstream_id:
                    ids.span_id, upstream_id = upstream_id, 0  # the id sent in traceparent
                self._client_span(call, _METHODS.get(call.kind, method), parent, ns, end, exchange)
        server.end(end)

    def _client_span(
        self,
        call: UpstreamCall,
        method: str,
        parent: Context,
        ns: Callable[[float], int],
        end: int,
        exchange: Exchange,
    ) -> None:
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "gateway.service": call.service,
            "gateway.call.kind": call.kind,
            "gateway.target": call.target,  # the label ("svc#0"), never the address
            "gateway.attempts": call.attempts,
            "gateway.outcome": call.outcome or "unknown",
        }
        if call.attempts > 1:
            attributes["http.request.resend_count"] = call.attempts - 1
        if call.status:
            attributes["http.response.status_code"] = call.status
        error = call.outcome != "ok" or call.status >= 400
        if error:
            attributes["error.type"] = call.outcome if call.outcome != "ok" else str(call.status)
        started = call.started or exchange.started
        span = self._tracer.start_span(
            f"{method} {call.service}",
            parent,
            SpanKind.CLIENT,
            attributes,
            start_time=ns(started),
        )
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end if call.ms is None else ns(started + call.ms / 1000))

    def _prefix(self, name: str) -> str | None:
        """The prefix of route `name` ("routes.N") in the current table."""
        routes = self._routes()
        if routes is not self._seen:
            self._seen, self._prefixes = routes, {r.name: r.prefix for r in routes}
        return self._prefixes.get(name)

    async def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Send what is queued and stop, waiting `timeout` seconds at most, off the loop (a
        collector that does not answer must not hold up shutdown)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shut_down() -> None:
            try:
                self._processor.shutdown_within(timeout)
                self.provider.shutdown()  # the processor's part is done: returns at once
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed first
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=shut_down, name="trace flush", daemon=True).start()
        with contextlib.suppress(TimeoutError):  # a stuck export: the daemon thread is left
            await asyncio.wait_for(done, timeout + 1.0)
