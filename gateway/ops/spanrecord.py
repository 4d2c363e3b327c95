"""What the gateway records of a traced request, and the spans the export process makes of it.

The gateway's side is as small as it can be: one `RequestRecord` a request, a tuple of values
the request had anyway (its Exchange's start, path, route, client; each UpstreamCall's start,
time to response head, target label, attempts, status), with the ids `Tracer.begin` chose and
two clock readings taken at the end. No span name, attribute dict, integer id or timestamp is
made there: `spans_of`, in the export child (gateway/ops/spanexport.py), makes the SDK's
ReadableSpans of them, one server span and a client span per call, which its OTLP exporter
encodes. The span's structure and attributes are described in gateway/ops/tracing.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
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

# A call: service, kind, target label, attempts, started (perf_counter; 0: not recorded), ms
# to the response head (None: no answer), status (0: none came), outcome ("ok", or why not).
CallRecord = tuple[str, str, str, int, float, float | None, int, str]
# A request: the traceparent sent upstream (its trace id, the forward's client span id), the
# server span's id (hex), the incoming traceparent and tracestate ("" when the trace began
# here: only sampled requests are recorded), method, path, scheme, status, client address,
# route prefix (None when no route matched), route name, end (ns since the epoch), the
# perf_counter at the end and at the start, the calls.
RequestRecord = tuple[
    str, str, str, str, str, str, str, int, str, str | None, str, int, float, float,
    Sequence[CallRecord],
]  # fmt: skip
CALLS: Final = 14  # the calls' index in a RequestRecord

UPSTREAM_KINDS: Final = frozenset({"forward", "websocket"})  # calls sent the traceparent
_METHODS: Final = {"auth": "GET"}  # call kinds whose method is not the client's
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSET: Final = Status(StatusCode.UNSET)
_ERROR: Final = Status(StatusCode.ERROR)
_NO_STATE: Final = TraceState()
_SERVER: Final = SpanKind.SERVER
_CLIENT: Final = SpanKind.CLIENT
_propagator: Final = TraceContextTextMapPropagator()


def spans_in(record: RequestRecord) -> int:
    """How many spans `record` makes: its server span and one per call."""
    return 1 + len(record[CALLS])


class SharedResource(Resource):
    """The one Resource of every span, its hash computed once: the SDK's encoder groups spans
    by resource, and Resource's own hash serializes its attributes to JSON at every span."""

    def __init__(self, attributes: dict[str, str]) -> None:
        super().__init__(attributes)  # no detectors: no I/O
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def spans_of(
    records: Sequence[RequestRecord], resource: Resource, scope: InstrumentationScope
) -> list[ReadableSpan]:
    """The SDK's ReadableSpans of `records` (the export child's side; tests use it too)."""
    out = []
    for (
        sent, server_hex, incoming, state_header, method, path, scheme, status, client, route,
        route_name, end, now, started, calls,
    ) in records:  # fmt: skip
        trace_id = int(sent[3:35], 16)
        parent: SpanContext | None = None
        state = _NO_STATE
        if incoming:  # the caller's span, with its tracestate, as the SDK's propagator reads it
            carrier = {"traceparent": incoming}
            if state_header:
                carrier["tracestate"] = state_header
            context = get_current_span(_propagator.extract(carrier)).get_span_context()
            if context.trace_id == trace_id:  # it is: start_exchange checked the header
                parent, state = context, context.trace_state
        server = SpanContext(trace_id, int(server_hex, 16), False, _SAMPLED, state)
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": path,  # never the query: it may hold secrets
            "url.scheme": scheme,
            "http.response.status_code": status,
            "client.address": client,
        }
        if route is not None:
            attributes["http.route"] = route
            attributes["gateway.route"] = route_name
        failed = status >= 500
        if failed:
            attributes["error.type"] = str(status)
        out.append(
            ReadableSpan(
                f"{method} {route}" if route is not None else method,
                server,
                parent,
                resource,
                attributes,
                kind=_SERVER,
                status=_ERROR if failed else _UNSET,
                start_time=end - int((now - started) * 1e9),
                end_time=end,
                instrumentation_scope=scope,
            )
        )
        upstream_id = int(sent[36:52], 16)  # the forward's span, named in the traceparent sent
        for call in calls:
            if call[1] in UPSTREAM_KINDS and upstream_id:
                span_id, upstream_id = upstream_id, 0
            else:
                span_id = random.getrandbits(64) or 1
            start = end - int((now - (call[4] or started)) * 1e9)
            ms = call[5]
            name, failed, call_attributes = _client(call, _METHODS.get(call[1], method))
            out.append(
                ReadableSpan(
                    name,
                    SpanContext(trace_id, span_id, False, _SAMPLED, state),
                    server,
                    resource,
                    call_attributes,
                    kind=_CLIENT,
                    status=_ERROR if failed else _UNSET,
                    start_time=start,
                    end_time=end if ms is None else start + int(ms * 1e6),
                    instrumentation_scope=scope,
                )
            )
    return out


def _client(call: CallRecord, method: str) -> tuple[str, bool, dict[str, str | int]]:
    """A client span's name, whether it failed, and its attributes."""
    service, kind, target, attempts, _, _, status, outcome = call
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "gateway.service": service,
        "gateway.call.kind": kind,
        "gateway.target": target,  # the label ("svc#0"), never the address
        "gateway.attempts": attempts,
    }
    if attempts > 1:
        attributes["http.request.resend_count"] = attempts - 1
    if status:
        attributes["http.response.status_code"] = status
    failed = outcome != "ok" or status >= 400
    if failed:  # the outcome (timeout, unavailable, ...), or the status when one came
        attributes["error.type"] = str(status) if outcome == "ok" else outcome or "unknown"
    return f"{method} {service}", failed, attributes


def plain(record: Any) -> Any:
    """`record` with values of the exact types marshal takes (a str or int subclass, an
    istr header value, becomes its plain value)."""
    kind = type(record)
    if record is None or kind in (str, int, float, bool):
        return record
    for exact in (bool, str, int, float):  # bool first: it is an int
        if isinstance(record, exact):
            return exact(record)
    return tuple(plain(item) for item in record)
