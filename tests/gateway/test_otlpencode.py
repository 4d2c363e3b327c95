"""gateway/ops/otlpencode.py, the export child's encoder: its request is the SDK encoder's,
byte for byte (the gateway's own spans, hand-made spans of every kind, random attributes);
the SDK's exporter, made as the child makes it, calls it, and POSTs what it built; and it
builds in place, where the SDK's encoder (the flaw, shown here) copies every message it hands
to a parent."""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import math
import sys
from collections.abc import Sequence
from types import CodeType, FrameType
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as sdk_encode_spans,
)
from opentelemetry.exporter.otlp.proto.http import trace_exporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from pytest_aiohttp import AiohttpServer

from gateway.ops import otlpencode, spanexport
from gateway.ops.spanrecord import CallRecord, RequestRecord, SharedResource, spans_of
from tests.gateway.conftest import base_url

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE}-00f067aa0ba902b7-01"
RESOURCE = SharedResource({"service.name": "edge"})
SCOPE = InstrumentationScope("gateway")


def same_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The adapter's request for `spans`, once checked to be the SDK encoder's, byte for byte."""
    ours: bytes = otlpencode.encode_spans(spans).SerializeToString()
    assert ours == sdk_encode_spans(spans).SerializeToString()
    return ours


def record(
    route: str | None,
    status: int,
    calls: list[CallRecord],
    *,
    incoming: str = "",
    state: str = "",
    method: str = "GET",
) -> RequestRecord:
    """A request the gateway recorded: it ended at 10**18 ns, 0.75 s after it began."""
    return (
        f"00-{TRACE}-00000000000000bb-01", "00000000000000aa", incoming, state, method,
        f"{route or ''}/x", "http", status, "127.0.0.1", route, "routes.0", 10**18, 1.0, 0.25,
        calls,
    )  # fmt: skip


def test_the_gateways_spans_are_the_sdk_encoders_request() -> None:
    forward: CallRecord = ("echo", "forward", "echo#0", 1, 0.5, 2.0, 200, "ok")
    records = [
        record("/api", 200, [("accounts", "auth", "accounts#0", 1, 0.3, 1.0, 200, "ok"), forward]),
        record("/api", 200, [forward], incoming=CALLER, state="vendor=1,other=x"),
        record("/open", 201, [forward], incoming=CALLER, method="POST"),
        record(None, 404, []),  # no route matched
        record("/gone", 502, [("gone", "forward", "gone#0", 1, 0.5, None, 0, "unavailable")]),
        record("/twice", 200, [("twice", "forward", "twice#1", 2, 0.5, 3.0, 200, "ok")]),
        record("/api", 401, [("accounts", "auth", "accounts#0", 1, 0.3, 1.0, 401, "ok")]),
        record(
            "/summary",
            200,
            [
                ("users", "part", "users#0", 1, 0.4, 1.5, 200, "ok"),
                ("orders", "part", "orders#0", 1, 0.4, None, 0, "timeout"),
                ("cards", "part", "cards#0", 1, 0.0, None, 0, "cancelled"),
            ],
        ),
        record(
            "/orders",
            503,
            [
                ("payments", "call", "payments#0", 1, 0.4, 4.0, 200, "ok"),
                ("stock", "call", "stock#0", 3, 0.6, 2.5, 503, "ok"),
                ("payments", "call", "payments#0", 1, 0.8, 1.0, 204, ""),
            ],
        ),
        record("/ws", 101, [("chat", "websocket", "chat#0", 1, 0.5, 0.5, 101, "ok")]),
    ]
    spans = spans_of(records, RESOURCE, SCOPE)
    assert {span.kind for span in spans} == {SpanKind.SERVER, SpanKind.CLIENT}

    encoded = ExportTraceServiceRequest.FromString(same_request(spans))

    (resource_spans,) = encoded.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert len(scope_spans.spans) == len(spans) == 24  # 10 requests, 14 calls
    assert same_request(spans[:1])
    assert same_request([]) == b""


def context(trace: int, span: int, *, remote: bool = False, state: str = "") -> SpanContext:
    return SpanContext(
        trace, span, remote, TraceFlags(TraceFlags.SAMPLED), TraceState.from_header([state])
    )


# Every kind of value the SDK's encoder takes, and some it leaves out (with their keys).
EVERY_VALUE: dict[str, Any] = {
    "str": "value",
    "empty": "",
    "unicode": "é ✓ 𝄞",
    "true": True,
    "false": False,
    "int": 42,
    "zero": 0,
    "negative": -(2**63),
    "largest": 2**63 - 1,
    "float": 1.5,
    "float.zero": 0.0,
    "nan": math.nan,
    "inf": -math.inf,
    "bytes": b"\x00\xff",
    "none": None,
    "strs": ("a", "b"),
    "ints": [1, 2, 3],
    "floats": (0.5, -0.25),
    "bools": (True, False),
    "mixed": ("a", 1, 2.5, True, None, b"b"),
    "nested": (("a",), [1, (2,)]),
    "no.items": (),
    "mapping": {"a": 1, 2: ("b",), "c": {"d": None}},
    "no.pairs": {},
    "too.big": 2**64,  # out of int64: left out
    "object": object(),  # no such type: left out
    "a.set": {1, 2},
    "bad.item": ("a", object()),  # the whole key is left out
    "lone.surrogate": "\ud800",
}


def test_spans_of_every_kind_are_the_sdk_encoders_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limited = BoundedAttributes(maxlen=2, attributes={"a": 1, "b": "two", "c": 3.0})
    events: BoundedList[Event] = BoundedList(maxlen=1)
    for n in range(3):
        events.append(Event(f"event.{n}", {"n": n}, timestamp=10**18 + n))
    links: BoundedList[Link] = BoundedList(maxlen=2)
    links.extend(
        [
            Link(context(7, 8, remote=True, state="k=v"), {"why": "remote"}),
            Link(context(7, 9), BoundedAttributes(maxlen=1, attributes={"x": 1, "y": 2})),
            Link(context(7, 10)),
        ]
    )
    resource = Resource({"service.name": "edge", "tags": ("a", "b")}, "https://schema/1")
    twin = Resource({"service.name": "edge", "tags": ("a", "b")}, "https://schema/1")
    other = Resource({"service.name": "other", "n": 1})
    scope = InstrumentationScope("lib", "1.2", "https://scope/1", {"lib.attr": True})
    scope_twin = InstrumentationScope("lib", "1.2", "https://scope/1", {"lib.attr": True})
    bare_scope = InstrumentationScope("bare")

    def span(n: int, **fields: Any) -> ReadableSpan:
        values: dict[str, Any] = {
            "name": f"span {n}",
            "context": context(1 << 100, n, state="a=1,b=2" if n % 2 else ""),
            "resource": resource,
            "instrumentation_scope": scope,
            "start_time": 10**18 + n,
            "end_time": 10**18 + 2 * n,
        }
        return ReadableSpan(**(values | fields))

    spans = [
        span(1, attributes=EVERY_VALUE, kind=SpanKind.INTERNAL),
        span(2, parent=context(1 << 100, 99, remote=True), kind=SpanKind.SERVER),
        span(3, parent=context(1 << 100, 2), kind=SpanKind.CLIENT, status=Status(StatusCode.OK)),
        span(4, kind=SpanKind.PRODUCER, status=Status(StatusCode.ERROR, "it broke")),
        span(5, kind=SpanKind.CONSUMER, status=Status(StatusCode.ERROR)),
        span(6, attributes=limited, events=events, links=links, resource=twin),
        span(7, events=[Event("plain", None, 5), Event("with", EVERY_VALUE, 6)]),
        span(8, links=[Link(context(3, 4), EVERY_VALUE)], instrumentation_scope=scope_twin),
        span(9, resource=other, instrumentation_scope=None),
        span(10, instrumentation_scope=bare_scope, start_time=None, end_time=None),
        span(11, resource=other, instrumentation_scope=bare_scope, name=""),
        span(12, context=context(2**128 - 1, 2**64 - 1), parent=context(5, 2**64 - 1)),
        span(13, resource=twin, instrumentation_scope=None, attributes={}),
        span(14, instrumentation_scope=scope),
    ]

    with caplog.at_level(logging.ERROR):
        sdk_logged = _logged(caplog, lambda: sdk_encode_spans(spans))
        ours_logged = _logged(caplog, lambda: otlpencode.encode_spans(spans))
    encoded = ExportTraceServiceRequest.FromString(same_request(spans))

    assert ours_logged == sdk_logged  # the same keys left out, and said so
    assert len(sdk_logged) == 3 * 5  # five of EVERY_VALUE, in a span, an event and a link
    # Grouped as the SDK groups: equal resources together, then equal scopes, first seen first.
    assert [len(r.scope_spans) for r in encoded.resource_spans] == [3, 2]
    assert [[len(s.spans) for s in r.scope_spans] for r in encoded.resource_spans] == [
        [10, 1, 1],
        [1, 1],
    ]


def _logged(caplog: pytest.LogCaptureFixture, encode: Any) -> list[str]:
    caplog.clear()
    encode()
    return [entry.getMessage() for entry in caplog.records]


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    st.integers(-(2**64), 2**64),  # out of int64 too: left out
    st.floats(),
    st.binary(max_size=6),
    st.frozensets(st.integers(0, 3), max_size=2),  # no such type: left out
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 9)), inner, max_size=3),
    ),
    max_leaves=6,
)
ATTRIBUTES = st.dictionaries(st.text(max_size=6), VALUES, max_size=5)


@settings(max_examples=150, deadline=None, derandomize=True)  # same cases every run
@given(
    attributes=st.lists(ATTRIBUTES, min_size=4, max_size=4),
    status=st.sampled_from(list(StatusCode)),
    description=st.one_of(st.none(), st.text(max_size=4)),
    remote=st.booleans(),
)
def test_random_attributes_are_encoded_as_the_sdk_encodes_them(
    attributes: list[dict[str, Any]], status: StatusCode, description: str | None, remote: bool
) -> None:
    spans = [
        ReadableSpan(
            "random",
            context(1, 2),
            context(1, 3, remote=remote),
            Resource({"service.name": "edge"}),
            attributes[0],
            events=[Event("event", attributes[1], 7)],
            links=[Link(context(4, 5, remote=not remote), attributes[2])],
            status=Status(status, description),
            start_time=1,
            end_time=2,
            instrumentation_scope=InstrumentationScope("scope", attributes=attributes[3]),
        )
    ]

    logging.disable(logging.ERROR)  # a value left out is logged, here several times a case
    try:
        same_request(spans)
    finally:
        logging.disable(logging.NOTSET)


async def test_the_export_childs_exporter_posts_what_the_adapter_builds(
    aiohttp_server: AiohttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The exporter module of this process (the test's) is put back as it was afterwards.
    sdks = trace_exporter.encode_spans  # type: ignore[attr-defined]
    monkeypatch.setattr(trace_exporter, "encode_spans", sdks)
    bodies: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    server = await aiohttp_server(app)
    exporter = spanexport.otlp_exporter(f"{base_url(server)}/v1/traces", 5.0)  # the child's
    forward: CallRecord = ("echo", "forward", "echo#0", 1, 0.5, 2.0, 200, "ok")
    spans = spans_of([record("/api", 200, [forward], incoming=CALLER)], RESOURCE, SCOPE)
    called: set[CodeType] = set()

    def export() -> SpanExportResult:
        def calls(frame: FrameType, event: str, _: object) -> None:
            if event == "call":
                called.add(frame.f_code)

        sys.setprofile(calls)  # this thread's Python calls, from here
        try:
            return exporter.export(spans)
        finally:
            sys.setprofile(None)

    try:
        assert await asyncio.to_thread(export) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]

    # An SDK whose export encodes some other way (or a child that makes its exporter without
    # installing the adapter) fails here: the SDK's encoder ran, or the adapter did not.
    assert otlpencode.encode_spans.__code__ in called
    assert sdk_encode_spans.__code__ not in called
    assert bodies == [same_request(spans)]


def test_the_sdk_encoder_copies_what_it_hands_a_parent_and_the_adapter_hands_nothing() -> None:
    # The flaw: a message given to its parent's constructor is copied, deeply; the SDK's
    # encoder does that at every level (KeyValue, Span, ScopeSpans, ResourceSpans).
    span = Span(name="before")
    span.attributes.add(key="k").value.string_value = "v"
    parent = ScopeSpans(spans=[span])
    span.name = "after"
    span.attributes[0].value.string_value = "changed"
    assert parent.spans[0].name == "before"
    assert parent.spans[0].attributes[0].value.string_value == "v"

    # Contained: the adapter makes one message, the request, with nothing given to it, and
    # adds every other where it stays; it never copies or merges one into another.
    tree = ast.parse(inspect.getsource(otlpencode))
    messages = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_pb2")
        for alias in node.names
    }
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    made = [
        ast.unparse(call)
        for call in calls
        if isinstance(call.func, ast.Name) and call.func.id in messages
    ]
    assert made == ["ExportTraceServiceRequest()"]
    methods = {call.func.attr for call in calls if isinstance(call.func, ast.Attribute)}
    assert "add" in methods
    assert not methods & {"CopyFrom", "MergeFrom", "MergeFromString", "append", "extend"}
