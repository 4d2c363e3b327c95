"""OpenTelemetry traces (`tracing:`, off by default): one server span per request, named for
its route, and one client span per upstream call (the forward, auth sub-requests, and later
aggregate parts and compose calls), exported by the SDK's BatchSpanProcessor and OTLP/HTTP
exporter from their own thread.

Nothing is timed twice. The spans are built after the request, at the end of dispatch, from
what the Exchange recorded (its start; each UpstreamCall's start, time to response head,
target label, attempts and status), with explicit timestamps. So a request costs the tracer
nothing until it ends, and an unsampled one almost nothing at all.

Propagation (W3C Trace Context). `start_exchange` keeps a valid incoming traceparent or begins
a trace. `Tracer.begin` then takes the SDK's ParentBased(TraceIdRatioBased) sampler's decision
by its rule (a remote parent's sampled flag; else the trace id's low 64 bits against the
ratio's bound, from TraceIdRatioBased itself; tests/gateway/test_tracing.py checks they agree),
and, for a sampled request, picks the server span's id and the forward call's: the traceparent
sent upstream names that client span, so upstream services join the trace as its children. At
the end the incoming context (with any tracestate) is read by the SDK's TraceContext
propagator, and the spans are the SDK's ReadableSpan, made whole with those ids.

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
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
)
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
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NO_STATE: Final = TraceState()
_UNSET: Final = Status(StatusCode.UNSET)
_ERROR: Final = Status(StatusCode.ERROR)
_SCOPE: Final = InstrumentationScope("gateway")
# The processor's own "Queue full" warning: never reached (a full queue is counted here
# first), and one log line per span would be the slowest possible way to drop it.
logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


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
        # ParentBased(TraceIdRatioBased(ratio))'s rule, taken once per request in `begin`.
        self._bound = TraceIdRatioBased.get_bound_for_rate(config.sample_ratio)
        self._resource = Resource({"service.name": config.service_name})  # no detectors: no I/O
        if exporter is None:
            exporter = OTLPSpanExporter(config.otlp_endpoint, timeout=EXPORT_TIMEOUT)
        self.processor = CountingProcessor(
            exporter, on_drop, max_queue_size=max_queue_size or MAX_QUEUE
        )

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
        """The request's spans, from its Exchange (at the end of dispatch). They are the SDK's
        ReadableSpan, made here whole, with the ids `begin` chose and explicit times: its
        Tracer API would redo the sampling and copy every attribute through its checks, at
        five times the cost."""
        spans = exchange.trace
        if spans is None:
            return
        now_ns, now = time.time_ns(), time.perf_counter()

        def ns(at: float) -> int:
            return now_ns - int((now - at) * 1e9)

        trace_id = int(exchange.trace_id, 16)
        parent: SpanContext | None = None
        state = _NO_STATE
        if spans.parent:  # the caller's span, with its tracestate, from the propagator
            parent = get_current_span(_propagator.extract(request.headers)).get_span_context()
            if parent.trace_id != trace_id:  # cannot be: start_exchange checked the header
                parent = None
            else:
                state = parent.trace_state
        method = request.method
        route = self._prefix(exchange.route)
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": exchange.path,  # never the query: it may hold secrets
            "url.scheme": request.scheme,
            "http.response.status_code": status,
            "client.address": exchange.client,
        }
        if route is not None:
            attributes["http.route"] = route
            attributes["gateway.route"] = exchange.route
        failed = status >= 500
        if failed:
            attributes["error.type"] = str(status)
        server = SpanContext(trace_id, int(spans.server, 16), False, _SAMPLED, state)
        end = ns(now)
        emit = self.processor.on_end
        emit(
            ReadableSpan(
                f"{method} {route}" if route is not None else method,
                server,
                parent,
                self._resource,
                attributes,
                kind=SpanKind.SERVER,
                status=_ERROR if failed else _UNSET,
                start_time=ns(exchange.started),
                end_time=end,
                instrumentation_scope=_SCOPE,
            )
        )
        upstream_id = int(spans.upstream, 16)
        for call in exchange.calls:
            if call.kind in _UPSTREAM_KINDS and upstream_id:
                span_id, upstream_id = upstream_id, 0  # the id sent in traceparent
            else:
                span_id = random.getrandbits(64) or 1
            context = SpanContext(trace_id, span_id, False, _SAMPLED, state)
            started = call.started or exchange.started
            finished = end if call.ms is None else ns(started + call.ms / 1000)
            emit(
                self._client_span(
                    call, _METHODS.get(call.kind, method), context, server, ns(started), finished
                )
            )

    def _client_span(
        self,
        call: UpstreamCall,
        method: str,
        context: SpanContext,
        parent: SpanContext,
        start: int,
        end: int,
    ) -> ReadableSpan:
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "gateway.service": call.service,
            "gateway.call.kind": call.kind,
            "gateway.target": call.target,  # the label ("svc#0"), never the address
            "gateway.attempts": call.attempts,
        }
        if call.attempts > 1:
            attributes["http.request.resend_count"] = call.attempts - 1
        if call.status:
            attributes["http.response.status_code"] = call.status
        failed = call.outcome != "ok" or call.status >= 400
        if failed:  # the outcome (timeout, unavailable, ...), or the status when one came
            attributes["error.type"] = (
                str(call.status) if call.outcome == "ok" else call.outcome or "unknown"
            )
        return ReadableSpan(
            f"{method} {call.service}",
            context,
            parent,
            self._resource,
            attributes,
            kind=SpanKind.CLIENT,
            status=_ERROR if failed else _UNSET,
            start_time=start,
            end_time=end,
            instrumentation_scope=_SCOPE,
        )

    def flush(self) -> None:
        """Export what is queued now (blocking: tests call it off the loop)."""
        self.processor.force_flush()

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
                self.processor.shutdown_within(timeout)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed first
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=shut_down, name="trace flush", daemon=True).start()
        with contextlib.suppress(TimeoutError):  # a stuck export: the daemon thread is left
            await asyncio.wait_for(done, timeout + 1.0)
