"""/metrics: Prometheus text that prometheus-client's own parser reads, and counters that move
as requests pass through the public app."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.http.exchange import Exchange, UpstreamCall
from gateway.ops.metrics import Metrics
from gateway.servers.admin import create_admin_app
from gateway.servers.public import create_app
from tests.gateway.conftest import GatewayClient, compile_gateway
from tests.polling import free_port
from tests.upstreams import make_gated_app

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ROUTES = """
version: 1
services:
  echo: {targets: [$ECHO]}
  dead:
    targets: [http://127.0.0.1:$DEAD1, http://127.0.0.1:$DEAD2]
    retries: 1
    circuit_breaker: {failures: 1, open_for: 1m}
  gated: {targets: [$GATED]}
routes:
  - {prefix: /echo, service: echo}
  - {prefix: /dead, service: dead}
  - {prefix: /gated, service: gated, strip_prefix: true}
"""


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Stack:
    """The public and admin clients of one gateway, and a gate the `gated` upstream waits on."""

    def __init__(self, public: GatewayClient, admin: GatewayClient, gate: asyncio.Event) -> None:
        self.public = public
        self.admin = admin
        self.gate = gate

    async def scrape(self) -> Samples:
        resp = await self.admin.get("/metrics")
        assert resp.status == 200
        return parse(await resp.text())

    async def until(self, name: str, expected: float, within: float = 2.0) -> None:
        """Scrape until the unlabelled series `name` reads `expected`, or fail at the deadline."""
        deadline = time.monotonic() + within
        while (seen := value(await self.scrape(), name)) != expected:
            assert time.monotonic() < deadline, f"{name} stayed at {seen}, not {expected}"
            await asyncio.sleep(0.01)


async def make_stack(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> Stack:
    gate = asyncio.Event()
    gated = await aiohttp_server(make_gated_app(gate))
    routes = ROUTES.replace("$DEAD1", str(free_port())).replace("$DEAD2", str(free_port()))
    gateway = compile_gateway(routes, echo=echo_upstream, gated=gated)
    public = await aiohttp_client(create_app(gateway))
    admin = await aiohttp_client(create_admin_app(gateway))
    return Stack(public, admin, gate)


async def test_request_counter_moves_by_route_method_and_status_class(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)
    before = await stack.scrape()

    for _ in range(3):
        assert (await stack.public.get("/echo/x")).status == 200
    assert (await stack.public.post("/echo/x", data=b"{}")).status == 200
    assert (await stack.public.get("/nowhere")).status == 404
    after = await stack.scrape()

    def moved(**labels: str) -> float:
        name = "gateway_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(route="routes.0", method="GET", status_class="2xx") == 3
    assert moved(route="routes.0", method="POST", status_class="2xx") == 1
    assert moved(route="none", method="GET", status_class="4xx") == 1


async def test_latency_histograms_count_each_request_and_each_upstream_call(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    for _ in range(2):
        assert (await stack.public.get("/echo/x")).status == 200
    assert (await stack.public.get("/nowhere")).status == 404
    samples = await stack.scrape()

    count = "gateway_request_duration_seconds_count"
    assert value(samples, count, route="routes.0") == 2
    assert value(samples, count, route="none") == 1
    assert value(samples, "gateway_upstream_duration_seconds_count", service="echo") == 2
    assert value(samples, "gateway_request_duration_seconds_sum", route="routes.0") > 0
    inf = value(samples, "gateway_request_duration_seconds_bucket", route="routes.0", le="+Inf")
    assert inf == 2


async def test_bytes_in_count_request_bodies_and_bytes_out_the_gateways_own_answers(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    await stack.public.post("/echo/upload", data=b"x" * 1000)
    problem = await (await stack.public.get("/nowhere")).read()
    samples = await stack.scrape()

    assert value(samples, "gateway_request_bytes_total", route="routes.0") == 1000
    assert value(samples, "gateway_response_bytes_total", route="none") == len(problem)


async def test_bytes_out_of_a_relayed_response_count_only_its_body(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    body = await (await stack.public.get("/echo/x")).read()
    samples = await stack.scrape()

    assert value(samples, "gateway_response_bytes_total", route="routes.0") == len(body)


async def test_upstream_errors_retries_health_and_circuit_state_are_exported(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    first = await stack.public.get("/dead/x")  # both targets refuse: one retry, then 502
    second = await stack.public.get("/dead/x")  # both circuits are open now: 503
    samples = await stack.scrape()

    assert (first.status, second.status) == (502, 503)
    errors = "gateway_upstream_errors_total"
    assert value(samples, errors, service="dead", kind="unavailable") == 1
    assert value(samples, errors, service="dead", kind="no_healthy_target") == 1
    assert value(samples, "gateway_upstream_retries_total", service="dead") == 1
    for target in ("dead#0", "dead#1"):
        assert value(samples, "gateway_target_healthy", service="dead", target=target) == 0
        assert value(samples, "gateway_circuit_state", service="dead", target=target) == 1
    assert value(samples, "gateway_target_healthy", service="echo", target="echo#0") == 1
    assert value(samples, "gateway_circuit_state", service="echo", target="echo#0") == 0


async def test_in_flight_gauge_counts_a_request_until_it_is_answered(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    pending = asyncio.ensure_future(stack.public.get("/gated/wait"))
    await stack.until("gateway_requests_in_flight", 1)
    stack.gate.set()
    resp = await pending

    assert await resp.text() == "released"
    await stack.until("gateway_requests_in_flight", 0)


async def test_an_unknown_method_is_counted_as_other_so_labels_stay_bounded(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    for method in ("PURGE", "PROPFIND", "MKCOL"):
        resp = await stack.public.request(method, "/echo/x")
        assert resp.status == 405
    samples = await stack.scrape()

    # The prefix matched routes.0, so its 405s count there, under one bounded method label.
    total = value(
        samples, "gateway_requests_total", route="routes.0", method="OTHER", status_class="4xx"
    )
    assert total == 3


async def test_reload_results_start_at_zero_and_the_last_load_is_reported_good(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, echo_upstream: TestServer
) -> None:
    stack = await make_stack(aiohttp_client, aiohttp_server, echo_upstream)

    samples = await stack.scrape()

    assert value(samples, "gateway_config_reloads_total", result="applied") == 0
    assert value(samples, "gateway_config_reloads_total", result="rejected") == 0
    assert value(samples, "gateway_config_last_reload_successful") == 1


def test_gateway_429s_count_as_rate_limit_rejections_and_cache_results_by_route() -> None:
    metrics = Metrics()
    limited = Exchange("id-1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01", route="routes.3")
    relayed = Exchange("id-2", limited.traceparent, route="routes.3", from_upstream=True)
    hit = Exchange("id-3", limited.traceparent, route="routes.3", cache="HIT")
    miss = Exchange("id-4", limited.traceparent, route="routes.3", cache="MISS")

    metrics.observe(limited, "GET", 429, 0, 120, 0.001)  # the gateway's own 429
    metrics.observe(relayed, "GET", 429, 0, 120, 0.001)  # an upstream's 429, relayed
    for exchange in (hit, hit, miss):
        metrics.observe(exchange, "GET", 200, 0, 10, 0.001)
    samples = parse(metrics.render().decode())

    assert value(samples, "gateway_rate_limit_rejections_total", route="routes.3") == 1
    assert value(samples, "gateway_cache_lookups_total", route="routes.3", result="hit") == 2
    assert value(samples, "gateway_cache_lookups_total", route="routes.3", result="miss") == 1


def test_each_observation_lands_in_its_bucket_and_the_sums_add_up() -> None:
    # observe() keeps the seconds and flush() puts them in buckets at once: the histogram
    # must read as if each had been observed on its own.
    metrics = Metrics()
    forward = UpstreamCall("echo", "forward", "echo#0", 1, 2.0, 200, "ok")  # 2 ms to its head
    for seconds in (0.0005, 0.003, 0.003, 2.0):
        exchange = Exchange("id", "00-" + "1" * 32 + "-" + "2" * 16 + "-01", route="routes.0")
        exchange.service, exchange.calls = "echo", (forward,)
        metrics.observe(exchange, "GET", 200, 0, 10, seconds)
    metrics.flush()
    metrics.observe(exchange, "GET", 200, 0, 10, 0.0005)  # after a flush: added on top
    samples = parse(metrics.render().decode())

    def bucket(le: str, name: str = "gateway_request_duration_seconds", **labels: str) -> float:
        return value(samples, f"{name}_bucket", le=le, **labels)

    assert bucket("0.001", route="routes.0") == 2
    assert bucket("0.0025", route="routes.0") == 2
    assert bucket("0.005", route="routes.0") == 4
    assert bucket("1.0", route="routes.0") == 4
    assert bucket("2.5", route="routes.0") == 5
    assert bucket("+Inf", route="routes.0") == 5
    assert value(samples, "gateway_request_duration_seconds_sum", route="routes.0") == (
        pytest.approx(2.007)
    )
    upstream = "gateway_upstream_duration_seconds"
    assert bucket("0.001", upstream, service="echo") == 0
    assert bucket("0.0025", upstream, service="echo") == 5
    assert value(samples, f"{upstream}_sum", service="echo") == pytest.approx(0.010)
    total = "gateway_requests_total"
    assert value(samples, total, route="routes.0", method="GET", status_class="2xx") == 5
