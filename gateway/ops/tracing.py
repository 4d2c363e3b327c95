"""OpenTelemetry traces (`tracing:`, off by default): one server span per request, named for
its route, and one client span per upstream call (the forward, auth sub-requests, and later
aggregate parts and compose calls), batched by the SDK's BatchSpanProcessor and exported by
its OTLP/HTTP exporter, which runs in a child process (gateway/ops/spanexport.py).

Nothing is timed twice. The spans are recorded after the request, at the end of dispatch,
from what the Exchange recorded (its start; each UpstreamCall's start, time to response head,
target label, attempts and status), with explicit timestamps. So a request costs the tracer
nothing until it ends, and an unsampled one almost nothing at all. A span is recorded as a
SpanRecord, a tuple of plain values: the child makes it the SDK's ReadableSpan, and encodes
and sends it, off this process (protobuf encoding is ~25 µs a span; this one pays ~3).

Propagation (W3C Trace Context). `start_exchange` keeps a valid incoming traceparent or begins
a trace. `Tracer.begin` then takes the SDK's ParentBased(TraceIdRatioBased) sampler's decision
by its rule (a remote parent's sampled flag; else the trace id's low 64 bits against the
ratio's bound, from TraceIdRatioBased itself; tests/gateway/test_tracing.py checks they agree),
and, for a sampled request, picks the server span's id and the forward call's: the traceparent
sent upstream names that client span, so upstream services join the trace as its children. At
the end the incoming context (with any tracestate) is read by the SDK's TraceContext
propagator, and the spans carry those ids.

Export never waits on the request path: each request's spans queue (bounded) for the
processor's thread, which hands them to the export child (at most spanexport.WINDOW messages
ahead of it); when the queue is full (a collector down or slow, the child behind) they are
dropped and counted (gateway_trace_spans_dropped_total) rather than logged, and so are the
spans a child held when it died.
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
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config.model import RouteConfig, TracingConfig
from gateway.http.exchange import TRACEPARENT, Exchange, TraceSpans, UpstreamCall, random_hex
from gateway.ops.spanexport import ExportProcess, SpanRecord

# The processor's queue holds requests: a request's spans are one item (most have two).
MAX_QUEUE: Final = 1024  # requests waiting for export; past this their spans are dropped, counted
BATCH: Final = 256  # requests per batch handed to the export process
SCHEDULE_MS: Final = 1000  # the processor sends what it has at least this often
EXPORT_TIMEOUT: Final = 5.0  # seconds one export (its retries included) may take
FLUSH_TIMEOUT: Final = 3.0  # seconds shutdown waits for the last spans to be sent
_UPSTREAM_KINDS: Final = frozenset({"forward", "websocket"})  # calls sent `exchange.traceparent`
_METHODS: Final = {"auth": "GET"}  # call kinds whose method is not the client's
_propagator: Final = TraceContextTextMapPropagator()
_SERVER: Final = SpanKind.SERVER.value
_CLIENT: Final = SpanKind.CLIENT.value
SCOPE: Final = "gateway"  # the spans' instrumentation scope
# The processor's own "Queue full" warning: never reached (a full queue is counted here
# first), and one log line per span would be the slowest possible way to drop it.
logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


class CountingProcessor(BatchSpanProcessor):
    """BatchSpanProcessor, its queue and thread, carrying each request's SpanRecords (one item:
    the SDK's enqueue costs a system call an item) to an ExportProcess; the queue is bounded
    and its overflow counted, not logged (the SDK drops silently but for a warning per span)."""

    def __init__(
        self,
        exporter: ExportProcess,
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
        # Queue one, waking the thread at a full batch. The SDK types it for ReadableSpan;
        # its queue and thread carry any item to the exporter, here lists of SpanRecords.
        self._put: Callable[[list[SpanRecord]], None] = self._batch_processor.emit  # type: ignore[assignment]
        self._limit = max_queue_size
        self._on_drop = on_drop
        self._exporter = exporter
        self._lost = 0  # of exporter.lost (its thread adds), counted so far

    def emit(self, spans: list[SpanRecord]) -> None:
        """Queue a request's spans (on the loop), or drop and count them when the queue is
        full."""
        if self._exporter.lost != self._lost:
            self.count_lost()
        if len(self._queue) >= self._limit:
            for _ in spans:
                self._on_drop()
            return
        self._put(spans)

    def count_lost(self) -> None:
        """Count the spans lost with a dead export child since the last call (on the loop:
        at the next request's spans, and at close)."""
        lost, self._lost = self._exporter.lost - self._lost, self._exporter.lost
        for _ in range(lost):
            self._on_drop()

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
        max_queue_size: int | None = None,  # default MAX_QUEUE
    ) -> None:
        self._routes = routes  # the current table's routes (for `http.route`)
        self._seen: Sequence[RouteConfig] = ()
        self._prefixes: dict[str, str] = {}
        # ParentBased(TraceIdRatioBased(ratio))'s rule, taken once per request in `begin`.
        self._bound = TraceIdRatioBased.get_bound_for_rate(config.sample_ratio)
        self.exporter = ExportProcess(
            config.otlp_endpoint, EXPORT_TIMEOUT, {"service.name": config.service_name}, SCOPE
        )
        self.processor = CountingProcessor(
            self.exporter, on_drop, max_queue_size=max_queue_size or MAX_QUEUE
        )
        # The child's imports take a while: they run while the gateway starts.
        threading.Thread(target=self.exporter.start, name="trace export start", daemon=True).start()

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
        """The request's spans, from its Exchange (at the end of dispatch), with the ids
        `begin` chose and explicit times, as SpanRecords: the SDK's Tracer API would redo the
        sampling and copy every attribute through its checks, and its ReadableSpan is built
        where it is encoded, in the export child."""
        spans = exchange.trace
        if spans is None:
            return
        end, now = time.time_ns(), time.perf_counter()  # ns since the epoch: `now` there
        trace_id = int(exchange.trace_id, 16)
        parent, remote, state = 0, False, ""
        if spans.parent:  # the caller's span, with its tracestate, from the propagator
            context = get_current_span(_propagator.extract(request.headers)).get_span_context()
            if context.trace_id == trace_id:  # it is: start_exchange checked the header
                parent, remote = context.span_id, context.is_remote
                state = context.trace_state.to_header() if context.trace_state else ""
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
        server = int(spans.server, 16)
        records: list[SpanRecord] = [
            (
                f"{method} {route}" if route is not None else method,
                trace_id, server, state, parent, remote, _SERVER,
                end - int((now - exchange.started) * 1e9), end, failed, attributes,
            )
        ]  # fmt: skip
        upstream_id = int(spans.upstream, 16)
        for call in exchange.calls:
            if call.kind in _UPSTREAM_KINDS and upstream_id:
                span_id, upstream_id = upstream_id, 0  # the id sent in traceparent
            else:
                span_id = random.getrandbits(64) or 1
            start = end - int((now - (call.started or exchange.started)) * 1e9)
            finished = end if call.ms is None else start + int(call.ms * 1e6)
            name, failed, call_attributes = _client(call, _METHODS.get(call.kind, method))
            records.append(
                (
                    name, trace_id, span_id, state, server, False, _CLIENT, start, finished,
                    failed, call_attributes,
                )
            )  # fmt: skip
        self.processor.emit(records)

    def flush(self, timeout: float = 10.0) -> bool:
        """Export what is queued now, to the collector, waiting `timeout` seconds at most for
        the export process (blocking: tests call it off the loop)."""
        self.processor.force_flush()
        return self.exporter.force_flush(int(timeout * 1000))

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
        self.processor.count_lost()


def _client(call: UpstreamCall, method: str) -> tuple[str, bool, dict[str, str | int]]:
    """A client span's name, whether it failed, and its attributes."""
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
    return f"{method} {call.service}", failed, attributes
