"""OpenTelemetry traces against a small OTLP/HTTP receiver on loopback: the spans the gateway
exports are decoded with opentelemetry-proto and checked for their structure (client spans
children of the server span, the server span a child of a sampled incoming traceparent), their
attributes, the sampling decision, and that a dead collector costs clients nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import istr
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.http.exchange import start_exchange
from gateway.ops import spanexport, spanrecord, tracing
from gateway.runtime.state import Gateway
from tests.gateway.conftest import GatewayClient, GatewayTestServer, base_url, compile_gateway
from tests.polling import eventually, free_port

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass
class Collector:
    """What the receiver got: every span, with the service.name of its resource."""

    spans: list[Span] = field(default_factory=list)
    services: set[str] = field(default_factory=set)
    posts: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        self.posts += 1
        for resource_spans in export.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def by_name(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def collector(aiohttp_server: AiohttpServer) -> tuple[Collector, TestServer]:
    received = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", received.handle)
    return received, await aiohttp_server(app)


async def verify(request: web.Request) -> web.Response:
    """A forward-auth service that admits everyone."""
    return web.Response(headers={"X-Consumer": "alice", "X-Auth-Scopes": "read"})


@pytest.fixture
async def accounts(aiohttp_server: AiohttpServer) -> TestServer:
    app = web.Application()
    app.router.add_get("/verify", verify)
    return await aiohttp_server(app)


TRACED = """
version: 1
tracing: {otlp_endpoint: "$COLLECTOR", sample_ratio: RATIO, service_name: edge}
auth:
  forward: {service: accounts, path: /verify}
services:
  accounts: {targets: [$ACCOUNTS]}
  echo: {targets: [$ECHO]}
  gone: {targets: ["http://127.0.0.1:1"], timeouts: {connect: 1s}}
  twice: {targets: ["http://127.0.0.1:1", $ECHO], retries: 1, balance: round_robin}
routes:
  - {prefix: /api, service: echo, auth: {any_of: [forward]}}
  - {prefix: /open, service: echo}
  - {prefix: /gone, service: gone}
  - {prefix: /twice, service: twice}
"""


async def traced(
    aiohttp_client: AiohttpClient, ratio: float = 1.0, **upstreams: TestServer | str
) -> tuple[GatewayClient, Gateway]:
    text = TRACED.replace("RATIO", str(ratio))
    for name, upstream in upstreams.items():
        url = upstream if isinstance(upstream, str) else base_url(upstream)
        text = text.replace(f"${name.upper()}", url)
    gateway = compile_gateway(text)
    client: Any = await aiohttp_client(GatewayTestServer(gateway))
    return client, gateway


async def flush(gateway: Gateway) -> None:
    """Export what is queued now (the processor's own schedule is once a second)."""
    assert gateway.tracer is not None
    await asyncio.to_thread(gateway.tracer.flush)


def attributes(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = value.int_value if value.HasField("int_value") else value.string_value
    return out


def sent_traceparent(body: dict[str, Any]) -> str:
    """The traceparent the echo upstream received."""
    value: str = dict(body["headers"])["traceparent"]
    return value


async def test_a_request_is_a_server_span_whose_children_are_its_upstream_calls(
    aiohttp_client: AiohttpClient,
    collector: tuple[Collector, TestServer],
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received, server = collector
    client, gateway = await traced(
        aiohttp_client, collector=server, accounts=accounts, echo=echo_upstream
    )

    response = await client.get(
        "/api/devices?secret=1", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    )
    upstream_saw = sent_traceparent(await response.json())
    await flush(gateway)
    await eventually(lambda: len(received.spans) == 3)

    assert response.status == 200
    (root,) = received.by_name("GET /api")
    (auth,) = received.by_name("GET accounts")
    (forward,) = received.by_name("GET echo")
    assert received.services == {"edge"}
    assert root.trace_id.hex() == CALLER_TRACE  # the caller's trace, joined
    assert root.parent_span_id.hex() == CALLER_SPAN
    assert root.kind == Span.SPAN_KIND_SERVER
    assert attributes(root) == {
        "http.request.method": "GET",
        "http.route": "/api",
        "gateway.route": "routes.0",
        "url.path": "/api/devices",  # never the query: it may hold secrets
        "url.scheme": "http",
        "client.address": "127.0.0.1",
        "http.response.status_code": 200,
    }
    for child in (auth, forward):
        assert child.trace_id.hex() == CALLER_TRACE
        assert child.parent_span_id == root.span_id
        assert child.kind == Span.SPAN_KIND_CLIENT
        assert root.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    assert auth.end_time_unix_nano <= forward.start_time_unix_nano  # auth decided first
    assert attributes(forward) == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "gateway.service": "echo",
        "gateway.call.kind": "forward",
        "gateway.target": "echo#0",
        "gateway.attempts": 1,
    }
    assert attributes(auth)["gateway.call.kind"] == "auth"
    assert attributes(auth)["gateway.target"] == "accounts#0"
    # Upstream joins the trace as the forward span's child.
    assert upstream_saw == f"00-{CALLER_TRACE}-{forward.span_id.hex()}-01"


async def test_a_failed_call_and_a_5xx_answer_are_error_spans(
    aiohttp_client: AiohttpClient,
    collector: tuple[Collector, TestServer],
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received, server = collector
    client, gateway = await traced(
        aiohttp_client, collector=server, accounts=accounts, echo=echo_upstream
    )

    response = await client.get("/gone/x")
    await flush(gateway)
    await eventually(lambda: len(received.spans) == 2)

    assert response.status == 502
    (root,) = received.by_name("GET /gone")
    (call,) = received.by_name("GET gone")
    assert root.parent_span_id == b""  # the trace began here
    assert root.status.code == root.status.STATUS_CODE_ERROR
    assert attributes(root)["error.type"] == "502"
    assert call.parent_span_id == root.span_id
    assert call.status.code == call.status.STATUS_CODE_ERROR
    assert attributes(call)["error.type"] == "unavailable"
    assert attributes(call)["gateway.target"] == "gone#0"
    assert "http.response.status_code" not in attributes(call)  # no answer came


async def test_a_retried_call_is_one_client_span_with_its_attempts(
    aiohttp_client: AiohttpClient,
    collector: tuple[Collector, TestServer],
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received, server = collector
    client, gateway = await traced(
        aiohttp_client, collector=server, accounts=accounts, echo=echo_upstream
    )

    statuses = [(await client.get("/twice")).status for _ in range(2)]  # one starts on the dead
    await flush(gateway)
    await eventually(lambda: len(received.by_name("GET twice")) == 2)

    assert statuses == [200, 200]
    retried = [s for s in received.by_name("GET twice") if attributes(s)["gateway.attempts"] == 2]
    assert len(retried) == 1
    assert attributes(retried[0])["http.request.resend_count"] == 1
    assert attributes(retried[0])["gateway.target"] == "twice#1"  # the one that answered
    assert attributes(retried[0])["http.response.status_code"] == 200


async def test_a_trace_begun_here_tells_upstream_its_id_and_the_sampling_decision(
    aiohttp_client: AiohttpClient,
    collector: tuple[Collector, TestServer],
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received, server = collector
    client, gateway = await traced(
        aiohttp_client, collector=server, accounts=accounts, echo=echo_upstream
    )

    upstream_saw = sent_traceparent(await (await client.get("/open")).json())
    await flush(gateway)
    await eventually(lambda: len(received.spans) == 2)

    (root,) = received.by_name("GET /open")
    (forward,) = received.by_name("GET echo")
    assert upstream_saw == f"00-{root.trace_id.hex()}-{forward.span_id.hex()}-01"


async def test_sample_ratio_zero_exports_nothing_but_a_sampled_caller_is_honoured(
    aiohttp_client: AiohttpClient,
    collector: tuple[Collector, TestServer],
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received, server = collector
    client, gateway = await traced(
        aiohttp_client, 0.0, collector=server, accounts=accounts, echo=echo_upstream
    )

    unsampled = [sent_traceparent(await (await client.get("/open")).json()) for _ in range(20)]
    caller_unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    passed = sent_traceparent(
        await (await client.get("/open", headers={"traceparent": caller_unsampled})).json()
    )
    await flush(gateway)
    nothing = list(received.spans)
    sampled = await client.get(
        "/open", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    )
    await flush(gateway)
    await eventually(lambda: len(received.spans) == 2)

    assert nothing == []
    assert all(tp.endswith("-00") for tp in unsampled)  # upstream records none of them either
    assert passed == caller_unsampled  # an unsampled caller's context goes on as it came
    assert sampled.status == 200
    assert {s.trace_id.hex() for s in received.spans} == {CALLER_TRACE}


def test_the_early_sampling_decision_is_the_sdk_samplers() -> None:
    """`begin` decides before any span exists (the traceparent sent upstream carries it); the
    SDK's ParentBased(TraceIdRatioBased) sampler decides again when the spans are built. They
    must agree, or upstream would record traces the gateway drops (or the reverse)."""
    ratio = 0.3
    routes = load_text(
        TRACED.replace("RATIO", str(ratio))
        .replace("$COLLECTOR", "http://127.0.0.1:1")
        .replace("$ACCOUNTS", "http://127.0.0.1:1")
        .replace("$ECHO", "http://127.0.0.1:1"),
        "routes.yaml",
        environ={},
    ).config
    assert routes is not None
    assert routes.tracing is not None
    tracer = tracing.Tracer(routes.tracing, lambda: routes.routes, lambda: None)
    sdk = ParentBased(TraceIdRatioBased(ratio))
    agreed, sampled = 0, 0
    try:
        request = make_mocked_request("GET", "/open")  # no traceparent: begun here
        for _ in range(2000):
            exchange = start_exchange(request)
            tracer.begin(exchange, request)
            decided = exchange.traceparent.endswith("-01")
            expected = sdk.should_sample(None, int(exchange.trace_id, 16), "GET").decision
            agreed += decided == (expected is Decision.RECORD_AND_SAMPLE)
            sampled += decided
    finally:
        tracer.processor.shutdown_within(1.0)

    assert agreed == 2000
    assert 450 < sampled < 750  # about 30 %


@pytest.fixture
def small_queue(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(tracing, "MAX_QUEUE", 8)
    return 8


async def test_a_dead_collector_costs_clients_nothing_and_dropped_spans_are_counted(
    aiohttp_client: AiohttpClient,
    small_queue: int,
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens: every export is refused
    client, gateway = await traced(
        aiohttp_client, collector=dead, accounts=accounts, echo=echo_upstream
    )

    slowest, statuses = 0.0, []
    for _ in range(200):
        started = time.perf_counter()
        response = await client.get("/open")
        await response.read()
        slowest = max(slowest, time.perf_counter() - started)
        statuses.append(response.status)
    gateway.metrics.flush()
    dropped = gateway.metrics.registry.get_sample_value("gateway_trace_spans_dropped_total")

    assert statuses == [200] * 200
    assert slowest < 0.5  # loopback requests: milliseconds; an export wait would be seconds
    # 400 spans, 2 a request: at most 8 requests queued, one batch of 8 in the processor's
    # hands, and WINDOW messages (a batch each) held by the export process, retrying.
    assert dropped is not None
    assert dropped >= 400 - 2 * small_queue * (2 + spanexport.WINDOW)


async def test_closing_the_gateway_with_a_dead_collector_is_bounded(
    accounts: TestServer, echo_upstream: TestServer
) -> None:
    text = (
        TRACED.replace("RATIO", "1")
        .replace("$COLLECTOR", f"http://127.0.0.1:{free_port()}")
        .replace("$ACCOUNTS", base_url(accounts))
        .replace("$ECHO", base_url(echo_upstream))
    )
    gateway = compile_gateway(text)
    assert gateway.tracer is not None
    started = time.monotonic()
    await gateway.tracer.close(timeout=0.5)

    assert time.monotonic() - started < 2.0


def test_tracing_is_off_unless_configured_and_the_endpoint_is_a_base_url() -> None:
    plain = load_text(
        "version: 1\nservices: {a: {targets: ['http://127.0.0.1:1']}}\n"
        "routes: [{prefix: /, service: a}]\n",
        "routes.yaml",
        environ={},
    ).config
    traced_config = load_text(
        TRACED.replace("RATIO", "0.25")
        .replace("$COLLECTOR", "http://collector:4318/")
        .replace("$ACCOUNTS", "http://127.0.0.1:1")
        .replace("$ECHO", "http://127.0.0.1:1"),
        "routes.yaml",
        environ={},
    ).config

    assert plain is not None
    assert plain.tracing is None
    assert Gateway(plain).tracer is None
    assert traced_config is not None
    assert traced_config.tracing is not None
    assert traced_config.tracing.otlp_endpoint == "http://collector:4318/v1/traces"
    assert traced_config.tracing.sample_ratio == 0.25
    assert traced_config.tracing.service_name == "edge"


@pytest.mark.parametrize(
    ("tracing_line", "expected"),
    [
        (
            "tracing: {otlp_endpoint: 'ftp://collector'}",
            "routes.yaml:2:26: tracing.otlp_endpoint: "
            "bad OTLP URL: the scheme must be http or https",
        ),
        (
            "tracing: {otlp_endpoint: 'http://c:4318', sample_ratio: 2}",
            "routes.yaml:2:57: tracing.sample_ratio: must be at most 1",
        ),
        (
            "tracing: {sample_ratio: 0.5}",
            "routes.yaml:2:10: tracing: missing required key 'otlp_endpoint'",
        ),
    ],
)
def test_bad_tracing_settings_are_config_errors(tracing_line: str, expected: str) -> None:
    text = (
        f"version: 1\n{tracing_line}\nservices: {{a: {{targets: ['http://127.0.0.1:1']}}}}\n"
        "routes: [{prefix: /, service: a}]\n"
    )

    result = load_text(text, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [expected]


async def test_a_reload_keeps_the_tracing_the_process_started_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def config(ratio: str) -> str:
        return (
            TRACED.replace("RATIO", ratio)
            .replace("$COLLECTOR", "http://127.0.0.1:1")
            .replace("$ACCOUNTS", "http://127.0.0.1:1")
            .replace("$ECHO", "http://127.0.0.1:1")
        )

    gateway = compile_gateway(config("0.5"))
    assert gateway.tracer is not None
    try:
        applied = gateway.apply(load_text(config("0.25"), "routes.yaml", environ={}))

        assert applied
        assert gateway.config.tracing is not None
        assert gateway.config.tracing.sample_ratio == 0.5
        assert "changing tracing needs a restart" in caplog.text
    finally:
        await gateway.tracer.close(timeout=0.5)


# The export process (gateway/ops/spanexport.py): supervised, bounded, flushed at shutdown.


@dataclass
class GatedCollector(Collector):
    """A collector whose answers wait until `gate` is set: an export stays in flight."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await self.gate.wait()
        return await super().handle(request)


async def test_a_killed_export_process_is_restarted_and_the_spans_it_held_are_counted(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received = GatedCollector()
    app = web.Application()
    app.router.add_post("/v1/traces", received.handle)
    server = await aiohttp_server(app)
    client, gateway = await traced(
        aiohttp_client, collector=server, accounts=accounts, echo=echo_upstream
    )
    assert gateway.tracer is not None
    exporter = gateway.tracer.exporter

    await client.get("/open")  # its 2 spans: in the export process's POST, which waits
    await asyncio.to_thread(gateway.tracer.processor.force_flush)
    await eventually(lambda: received.arrived == 1, within=15.0)
    first = exporter.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: _dead(first))
    received.gate.set()
    later = sent_traceparent(await (await client.get("/open")).json())
    assert await asyncio.to_thread(gateway.tracer.flush, 15.0)  # to a new export process
    await client.get("/open")  # the loss is counted on the loop, at the next span
    gateway.metrics.flush()

    assert exporter.starts == 2
    assert exporter.pid not in (None, first)
    assert gateway.metrics.registry.get_sample_value("gateway_trace_spans_dropped_total") == 2
    assert later[3:35] in {s.trace_id.hex() for s in received.by_name("GET /open")}


@contextlib.asynccontextmanager
async def running_exporter(
    server: TestServer, timeout: float
) -> AsyncIterator[tuple[spanexport.ExportProcess, int]]:
    """An ExportProcess to `server`'s /v1/traces, its child started, and the child's pid;
    shut down on the way out."""
    exporter = spanexport.ExportProcess(
        f"{base_url(server)}/v1/traces", timeout, {"service.name": "edge"}, "gateway"
    )
    try:
        await asyncio.to_thread(exporter.start)
        child = exporter.pid
        assert child is not None
        yield exporter, child
    finally:
        await asyncio.to_thread(exporter.shutdown, 5000)


async def test_a_hung_export_process_is_killed_and_the_spans_it_held_are_counted(
    collector: tuple[Collector, TestServer],
) -> None:
    received, server = collector
    records = [_record(f"/{n}") for n in range((spanexport.WINDOW + 1) * spanexport.CHUNK)]
    # 0.5 s export timeout: hung after 2 s without an answer
    async with running_exporter(server, 0.5) as (exporter, hung):
        os.kill(hung, signal.SIGSTOP)  # it reads nothing more, and answers nothing

        result = await asyncio.to_thread(exporter.export, records)  # fills the window, waits
        assert await asyncio.to_thread(exporter.force_flush, 15000)

    assert result is SpanExportResult.SUCCESS
    assert exporter.starts == 2
    # What the hung one held (its window, or less if the socket's buffer is smaller) is
    # counted; the rest went to the next one.
    assert spanexport.CHUNK <= exporter.lost <= spanexport.WINDOW * spanexport.CHUNK
    assert [s.name for s in received.spans] == [f"GET {r[9]}" for r in records[exporter.lost :]]


async def test_the_export_process_runs_below_the_gateways_priority(
    collector: tuple[Collector, TestServer],
) -> None:
    received, server = collector
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, ours + spanexport.NICENESS)
    if expected == ours:
        pytest.skip("the tests run at nice 19: the export process cannot go lower")
    async with running_exporter(server, 5.0) as (exporter, child):
        # It lowers its own priority once it runs: poll until it has.
        await eventually(lambda: os.getpriority(os.PRIO_PROCESS, child) != ours)
        niceness = os.getpriority(os.PRIO_PROCESS, child)
        # Its spans still go out.
        result = await asyncio.to_thread(exporter.export, [_record("/niced")])
        assert await asyncio.to_thread(exporter.force_flush, 15000)

    assert niceness == expected
    assert result is SpanExportResult.SUCCESS
    assert [s.name for s in received.spans] == ["GET /niced"]


async def test_the_export_process_rebuilds_what_the_gateway_recorded(
    collector: tuple[Collector, TestServer],
) -> None:
    received, server = collector
    exporter = spanexport.ExportProcess(
        f"{base_url(server)}/v1/traces", 5.0, {"service.name": "edge"}, "gateway"
    )
    call = ("echo", "forward", "echo#1", 2, 0.5, 2.0, 0, "timeout")  # no answer: 2 ms waited
    record = _record(
        "/api", incoming=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", state="vendor=1,other=x"
    )
    # An istr (a str subclass) for the method: marshal takes exact types only.
    odd = (*record[:4], istr("GET"), *record[5:7], 502, *record[8:14], [call])
    try:
        assert await asyncio.to_thread(exporter.export, [odd]) is SpanExportResult.SUCCESS
        assert await asyncio.to_thread(exporter.force_flush, 15000)
    finally:
        await asyncio.to_thread(exporter.shutdown, 5000)

    (span,) = received.by_name("GET /api")
    (client,) = received.by_name("GET echo")
    assert received.services == {"edge"}
    assert span.trace_id.hex() == CALLER_TRACE
    assert span.span_id.hex() == "00000000000000aa"
    assert span.parent_span_id.hex() == CALLER_SPAN
    assert span.flags & 0x300 == 0x300  # the parent is remote (and says so)
    assert span.trace_state == "vendor=1,other=x"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.status.code == span.status.STATUS_CODE_ERROR
    # Ended at 10**18 ns, 0.75 s after its start (perf_counter 0.25 then, 1.0 at the end).
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (10**18 - 75 * 10**7, 10**18)
    assert attributes(span) == {
        "http.request.method": "GET",
        "url.path": "/api/x",
        "url.scheme": "http",
        "http.response.status_code": 502,
        "client.address": "127.0.0.1",
        "http.route": "/api",
        "gateway.route": "routes.0",
        "error.type": "502",
    }
    assert client.trace_id.hex() == CALLER_TRACE
    assert client.span_id.hex() == "00000000000000bb"  # the id the forward sent upstream
    assert client.parent_span_id == span.span_id
    assert client.flags & 0x300 == 0x100  # its parent is local
    assert client.trace_state == "vendor=1,other=x"
    assert client.kind == Span.SPAN_KIND_CLIENT
    assert client.status.code == client.status.STATUS_CODE_ERROR
    start = 10**18 - 5 * 10**8  # began at perf_counter 0.5
    assert (client.start_time_unix_nano, client.end_time_unix_nano) == (start, start + 2 * 10**6)
    assert attributes(client) == {
        "http.request.method": "GET",
        "gateway.service": "echo",
        "gateway.call.kind": "forward",
        "gateway.target": "echo#1",
        "gateway.attempts": 2,
        "http.request.resend_count": 1,
        "error.type": "timeout",
    }


async def test_closing_sends_the_spans_recorded_before_it(
    aiohttp_client: AiohttpClient,
    collector: tuple[Collector, TestServer],
    accounts: TestServer,
    echo_upstream: TestServer,
) -> None:
    received, server = collector
    client, gateway = await traced(
        aiohttp_client, collector=server, accounts=accounts, echo=echo_upstream
    )
    assert gateway.tracer is not None
    assert await asyncio.to_thread(gateway.tracer.flush, 15.0)  # the export process is up

    await client.get("/open")
    await gateway.tracer.close()

    assert {s.name for s in received.spans} == {"GET /open", "GET echo"}
    assert gateway.tracer.exporter.pid is None  # it has exited


def _dead(pid: int) -> bool:
    """Whether our child `pid` has exited (it is not reaped: its Popen still does that)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _record(route: str, *, incoming: str = "", state: str = "") -> spanrecord.RequestRecord:
    """A GET of `route`/x that ended at 10**18 ns, 0.75 s after it began, with no call."""
    return (
        f"00-{CALLER_TRACE}-00000000000000bb-01", "00000000000000aa", incoming, state, "GET",
        f"{route}/x", "http", 200, "127.0.0.1", route, "routes.0", 10**18, 1.0, 0.25, [],
    )  # fmt: skip
