"""OpenTelemetry traces (`tracing:`, off by default): one server span per request, named for
its route, and one client span per upstream call (the forward, auth sub-requests, and later
aggregate parts and compose calls), batched by the SDK's BatchSpanProcessor and exported by
its OTLP/HTTP exporter, which runs in a child process (gateway/ops/spanexport.py).

Nothing is timed twice, and next to nothing is done here. At the end of dispatch a sampled
request's values are taken as they are from what the Exchange recorded (its start, path,
route, client; each UpstreamCall's start, time to response head, target label, attempts and
status), with the ids `begin` chose and two clock readings, into one RequestRecord, a tuple
(gateway/ops/spanrecord.py). The spans are made of it in the export child: their names,
attributes, integer ids and timestamps, the incoming context (with any tracestate) read by
the SDK's TraceContext propagator, the SDK's ReadableSpans, and their protobuf encoding
(the SDK exporter's request, built in place by gateway/ops/otlpencode.py; ~13 µs a span in
all). So a request costs the tracer nothing until it ends, an unsampled one next to nothing
at all (a header comparison and a string comparison), and a sampled one ~2 µs here.

The spans: the server span `METHOD PREFIX` (just `METHOD` when no route matched), with
`http.request.method`, `url.path` (never the query), `url.scheme`, `http.response.status_code`,
`client.address`, `http.route` and `gateway.route` (when a route matched), `error.type` and
an error status for a 5xx; each client span `METHOD SERVICE`, the server span's child, with
`http.request.method`, `gateway.service`, `gateway.call.kind`, `gateway.target` (the label,
never the address), `gateway.attempts`, `http.request.resend_count` when retried,
`http.response.status_code` when an answer came, and `error.type` (the outcome, or the 4xx or
5xx status) and an error status when it failed. A client span ends at the response head.

Propagation (W3C Trace Context). `start_exchange` keeps a valid incoming traceparent or begins
a trace. `Tracer.begin` then takes the SDK's ParentBased(TraceIdRatioBased) sampler's decision
by its rule (a remote parent's sampled flag; else the trace id's low 64 bits against the
ratio's bound, from TraceIdRatioBased itself, compared as hex digits; tests/gateway/
test_tracing.py checks they agree), and, for a sampled request, picks the server span's id and
the forward call's: the traceparent sent upstream names that client span, so upstream
services join the trace as its children. An unsampled one is sent with the flag cleared.

Export never waits on the request path: each request's record is one item of the processor's
(bounded) queue, whose thread hands BATCH at a time to the export child (at most
spanexport.WINDOW messages ahead of it); when the queue is full (a collector down or slow, the
child behind) their spans are dropped and counted (gateway_trace_spans_dropped_total) rather
than logged, and so are the spans a child held when it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from aiohttp import web
from multidict import istr
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from gateway.config.model import RouteConfig, TracingConfig
from gateway.http.exchange import TRACEPARENT, Exchange, TraceSpans, random_hex
from gateway.ops.spanexport import ExportProcess
from gateway.ops.spanrecord import RequestRecord, spans_in

MAX_QUEUE: Final = 1024  # requests waiting for export; past this their spans are dropped, counted
BATCH: Final = 512  # requests per batch handed to the export process: its OTLP request
SCHEDULE_MS: Final = 1000  # the processor sends what it has at least this often
EXPORT_TIMEOUT: Final = 5.0  # seconds one export (its retries included) may take
FLUSH_TIMEOUT: Final = 3.0  # seconds shutdown waits for the last spans to be sent
TRACESTATE: Final = istr("tracestate")
SAMPLED_FLAGS: Final = "13579bdf"  # a traceparent's last digit when its sampled bit is set
SCOPE: Final = "gateway"  # the spans' instrumentation scope
# The processor's own "Queue full" warning: never reached (a full queue is counted here
# first), and one log line per span would be the slowest possible way to drop it.
logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


class CountingProcessor(BatchSpanProcessor):
    """BatchSpanProcessor, its queue and thread, carrying each request's RequestRecord (one
    item) to an ExportProcess; the queue is bounded and its overflow counted, not logged (the
    SDK drops silently but for a warning per span)."""

    def __init__(
        self,
        exporter: ExportProcess,
        on_drop: Callable[[], None],
        max_queue_size: int = MAX_QUEUE,
        schedule_delay_millis: float = SCHEDULE_MS,
    ) -> None:
        self._batch = min(BATCH, max_queue_size)
        super().__init__(
            exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=self._batch,
            schedule_delay_millis=schedule_delay_millis,
        )
        # The processor's deque (a fork clears it and keeps it). `emit` appends to it and
        # wakes the processor's thread itself, as the SDK's emit does, without its checks
        # per item (the process id, a system call; a shutdown, which the gateway's close
        # orders after the last request). The SDK types the queue for ReadableSpan; its
        # thread carries any item to the exporter, here RequestRecords.
        # tests/gateway/test_tracing.py checks the drops.
        self._queue: deque[RequestRecord] = self._batch_processor._queue
        self._limit = max_queue_size
        self._on_drop = on_drop
        self._exporter = exporter
        self._lost = 0  # of exporter.lost (its thread adds), counted so far

    def emit(self, record: RequestRecord) -> None:
        """Queue a request's record (on the loop), waking the thread at a full batch; or drop
        and count its spans when the queue is full."""
        if self._exporter.lost != self._lost:
            self.count_lost()
        queue = self._queue
        if len(queue) >= self._limit:
            for _ in range(spans_in(record)):
                self._on_drop()
            return
        queue.appendleft(record)  # the thread pops the oldest, from the right
        if len(queue) >= self._batch:
            wake = self._batch_processor._worker_awaken  # read here: a fork makes a new one
            if not wake.is_set():
                wake.set()

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
        # ParentBased(TraceIdRatioBased(ratio))'s rule, taken once per request in `begin`: the
        # trace id's low 64 bits below the sampler's bound, compared as 16 lower-case hex
        # digits ("g" sorts after them all: a bound of 2**64 samples every trace).
        bound = TraceIdRatioBased.get_bound_for_rate(config.sample_ratio)
        self._below = f"{bound:016x}" if bound < 1 << 64 else "g"
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
            if header[54] not in SAMPLED_FLAGS:
                return  # passed on as it came, unsampled
            parent = header[36:52]
        elif header[19:35] < self._below:  # begun here: the trace id decides
            parent = ""
        else:
            exchange.traceparent = header[:53] + "00"  # tell upstream it is not recorded
            return
        ids = random_hex(32)
        exchange.trace = TraceSpans(parent, ids[:16], ids[16:])
        exchange.traceparent = f"00-{header[3:35]}-{ids[16:]}-01"

    def record(self, request: web.BaseRequest, exchange: Exchange, status: int) -> None:
        """The request's RequestRecord, at the end of dispatch: the values its spans are made
        of, in the export process (gateway/ops/spanrecord.py), with the ids `begin` chose and
        the clocks read now (the SDK's Tracer API would redo the sampling and copy every
        attribute through its checks)."""
        spans = exchange.trace
        if spans is None:
            return
        end, now = time.time_ns(), time.perf_counter()  # ns since the epoch: `now` there
        if spans.parent:  # the caller's span, read in the export process
            headers = request.headers
            incoming, state = headers.get(TRACEPARENT, ""), headers.get(TRACESTATE, "")
        else:
            incoming = state = ""
        route = exchange.route
        self.processor.emit(
            (
                exchange.traceparent, spans.server, incoming, state, request.method,
                exchange.path, request.scheme, status, exchange.client, self._prefix(route),
                route, end, now, exchange.started,
                [
                    (c.service, c.kind, c.target, c.attempts, c.started, c.ms, c.status, c.outcome)
                    for c in exchange.calls
                ],
            )
        )  # fmt: skip

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
