"""The OTLP request of a batch of spans, built in place: the SDK's `encode_spans`, without
its copies. The export child (gateway/ops/spanexport.py) has the SDK's OTLPSpanExporter call
this instead (`install`); its HTTP, retries, compression, headers and timeouts are the SDK's.

The flaw contained: the SDK's encoder (opentelemetry.exporter.otlp.proto.common, its
trace_encoder) builds each message bottom-up and hands the built ones to their parent's
constructor (a Span its KeyValues, a ScopeSpans its Spans, a ResourceSpans its ScopeSpans, the
request its ResourceSpans), and with protobuf's upb backend a message passed to a constructor is
copied, deeply: every span is copied about three times before the request is serialized, four
fifths of the export process's CPU (~22 µs a span of the gateway's, where this takes ~7).

Here the request is made first and every message is added to its parent where it will stay
(`request.resource_spans.add()`, `.scope_spans.add()`, `.spans.add()`, `.attributes.add()`),
its fields set there; no message is passed to a constructor or copied. What is built is the
SDK's request, field for field and byte for byte (tests/gateway/test_otlpencode.py holds it to
that for every kind of span and attribute): spans grouped by resource, then by instrumentation
scope, in the order each was first seen; a value of a type OTLP has no place for is left out
with its key and logged, as the SDK's does. The SDK's span kind map and trace state text
are used as they are, its flags' values read once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_trace_state,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import Attributes

# The SDK encoder's logger, for the same message when a value cannot be encoded.
_logger: Final = logging.getLogger("opentelemetry.exporter.otlp.proto.common._internal")
# The SDK's span kinds and flags, read once: an enum's hash (its map's key) and a protobuf
# enum's attribute (its _span_flags reads two) are Python calls, ~0.2 and ~0.6 µs each.
_KINDS: Final = {kind._value_: code for kind, code in _SPAN_KIND_MAP.items()}
_LOCAL: Final = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE: Final = _LOCAL | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_UNSEEN: Final = object()  # no span's resource or scope: the first span starts a group
Groups = dict[Resource, tuple[Any, dict[InstrumentationScope | None, ScopeSpans]]]


def encode_spans(sdk_spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The SDK's `encode_spans(sdk_spans)`, its signature too: the same message, built in
    place."""
    request = ExportTraceServiceRequest()
    groups: Groups = {}
    resource: object = _UNSEEN
    scope: object = _UNSEEN
    into: Any = None  # the spans of the ScopeSpans of the last span's resource and scope
    for span in sdk_spans:
        if span.resource is not resource or (span.instrumentation_scope or None) is not scope:
            resource, scope = span.resource, span.instrumentation_scope or None
            into = _scope_spans(request, groups, span.resource, scope).spans
        _span(into, span)
    return request


def install() -> bool:
    """Make the SDK's OTLP/HTTP span exporter call `encode_spans` (this module's) where it
    calls its own. False, and a warning, when its `export` no longer calls it by that name:
    the SDK's encoder then serves (correct, and slower)."""
    from opentelemetry.exporter.otlp.proto.http import trace_exporter

    if "encode_spans" not in trace_exporter.OTLPSpanExporter.export.__code__.co_names:
        _logger.warning("OTLP span exporter: no encode_spans to replace; the SDK's encodes")
        return False
    # setattr: the module does not name encode_spans among its exports, for mypy.
    setattr(trace_exporter, "encode_spans", encode_spans)  # noqa: B010
    return True


def _scope_spans(
    request: ExportTraceServiceRequest,
    groups: Groups,
    resource: Resource,
    scope: InstrumentationScope | None,
) -> ScopeSpans:
    """The ScopeSpans of `resource` and `scope` in `request`, added when new (equal resources,
    and equal scopes, share one, as in the SDK's grouping)."""
    found = groups.get(resource)
    if found is None:
        resource_spans = request.resource_spans.add(schema_url=resource.schema_url)
        resource_spans.resource.SetInParent()  # present even with no attributes
        _attributes(resource_spans.resource.attributes, resource.attributes)
        found = groups[resource] = (resource_spans, {})
    resource_spans, scopes = found
    scope_spans = scopes.get(scope)
    if scope_spans is None:
        scope_spans = scopes[scope] = resource_spans.scope_spans.add(
            schema_url=scope.schema_url if scope else None
        )
        scope_spans.scope.SetInParent()  # present when the span has no scope, too
        if scope is not None:
            if scope.name is not None:
                scope_spans.scope.name = scope.name
            if scope.version is not None:
                scope_spans.scope.version = scope.version
            _attributes(scope_spans.scope.attributes, scope.attributes)
    return scope_spans


def _span(into: Any, span: ReadableSpan) -> None:
    """`span` added to `into` (a ScopeSpans' spans). Fields given as None are left unset, as
    in the SDK's `Span(...)`."""
    context: Any = span.get_span_context()
    parent = span.parent
    state = context.trace_state
    out = into.add(
        trace_id=context.trace_id.to_bytes(16, "big"),  # the SDK's _encode_trace_id
        span_id=context.span_id.to_bytes(8, "big"),  # its _encode_span_id
        trace_state=_encode_trace_state(state) if state else None,  # "" is unset, too
        parent_span_id=parent.span_id.to_bytes(8, "big") if parent else None,
        name=span.name,
        kind=_KINDS[span.kind._value_],
        start_time_unix_nano=span.start_time,
        end_time_unix_nano=span.end_time,
        dropped_attributes_count=span.dropped_attributes,
        dropped_events_count=span.dropped_events,
        dropped_links_count=span.dropped_links,
        flags=_REMOTE if parent and parent.is_remote else _LOCAL,  # the SDK's _span_flags
    )
    _attributes(out.attributes, span.attributes)
    for event in span.events:
        added = out.events.add(
            name=event.name,
            time_unix_nano=event.timestamp,
            dropped_attributes_count=event.dropped_attributes,
        )
        _attributes(added.attributes, event.attributes)
    for link in span.links:
        linked = out.links.add(
            trace_id=link.context.trace_id.to_bytes(16, "big"),
            span_id=link.context.span_id.to_bytes(8, "big"),
            dropped_attributes_count=link.dropped_attributes,
            flags=_REMOTE if link.context.is_remote else _LOCAL,
        )
        _attributes(linked.attributes, link.attributes)
    status = span.status
    if status is not None:
        code, message = status.status_code._value_, status.description
        if code or message is not None:
            out.status.code = code
            if message is not None:
                out.status.message = message
        else:
            out.status.SetInParent()  # present when UNSET, too


def _attributes(into: Any, attributes: Attributes) -> None:
    """`attributes` added to `into`, each a KeyValue; one the SDK cannot encode is left out
    (and logged), as there."""
    if not attributes:
        return
    add = into.add
    count = len(into)
    for key, value in attributes.items():
        kind = type(value)
        try:
            pair = add()
            pair.key = key
            if kind is str:  # the common types first
                pair.value.string_value = value
            elif kind is int:
                pair.value.int_value = value
            else:
                _value(pair.value, value)
        except Exception as error:  # what the SDK's encoder catches
            if len(into) > count:  # added, half made: taken out
                del into[-1]
            _logger.exception("Failed to encode key %s: %s", key, error)
        else:
            count += 1


def _value(out: AnyValue, value: Any) -> None:
    """The SDK's `_encode_value(value)`, into `out`: its types, tested in its order."""
    if value is None:
        out.SetInParent()
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, bytes):
        out.bytes_value = value
    elif isinstance(value, Sequence):
        array = out.array_value
        array.SetInParent()
        for item in value:
            _value(array.values.add(), item)
    elif isinstance(value, Mapping):
        pairs = out.kvlist_value
        pairs.SetInParent()
        for key, item in value.items():
            _value(pairs.values.add(key=str(key)).value, item)
    else:
        raise Exception(f"Invalid type {type(value)} of value {value}")  # the SDK's
