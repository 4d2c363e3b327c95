"""Active health checks against real loopback targets whose /healthz answer a test flips:
a target is taken out and brought back, and probe tasks stop on close and on reload."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.config.build import load_text
from gateway.config.model import CircuitBreakerConfig, HealthCheckConfig, TargetConfig
from gateway.runtime.state import Gateway
from gateway.upstream import health
from gateway.upstream.breaker import CircuitBreaker
from gateway.upstream.health import judge
from gateway.upstream.service import Target as UpstreamTarget
from tests.gateway.conftest import MakeGateway, compile_gateway
from tests.polling import eventually
from tests.resilience_upstreams import (
    Target,
    gateway_of,
    in_batches,
    one_service,
    serve,
    status,
)

CHECK = "{path: /healthz, interval: 20ms, healthy_threshold: 2, unhealthy_threshold: 2}"
TWO_SERVICES = """
version: 1
services:
  svc: {targets: [$A], health_check: {path: /healthz, interval: 20ms}}
  other: {targets: [$A], health_check: {path: /healthz, interval: 20ms}}
  passive: {targets: [$A]}
routes:
  - {prefix: /svc, service: svc}
  - {prefix: /other, service: other}
  - {prefix: /passive, service: passive}
"""
OTHER = "  other: {targets: [$A], health_check: {path: /healthz, interval: 20ms}}\n"


def probe_tasks() -> dict[str, asyncio.Task[object]]:
    """The running probe tasks, by service name (HealthChecker names them)."""
    prefix = "health-check "
    return {
        t.get_name().removeprefix(prefix): t
        for t in asyncio.all_tasks()
        if t.get_name().startswith(prefix) and not t.done()
    }


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def reload(gateway: Gateway, text: str, url: str) -> None:
    result = load_text(text.replace("$A", url), "routes.yaml", environ={})
    assert gateway.apply(result), [str(e) for e in result.errors]


def test_a_target_needs_its_threshold_of_probes_in_a_row_to_change() -> None:
    check = HealthCheckConfig("/healthz", healthy_threshold=2, unhealthy_threshold=3)
    target = UpstreamTarget(
        TargetConfig("http://t"), "svc#0", CircuitBreaker("svc#0", CircuitBreakerConfig())
    )
    streak, seen = 0, []
    for ok in [False, False, True, False, False, False, True, True]:
        streak = judge(target, check, ok, streak)
        seen.append(target.healthy)

    assert seen == [True, True, True, True, True, False, False, True]


async def test_a_failing_check_takes_a_target_out_until_it_passes_again(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a, b = Target("a"), Target("b")
    url_a, url_b = await serve(aiohttp_server, a, b)
    client = await make_gateway(one_service(f"[{url_a}, {url_b}]", health_check=CHECK))
    target = gateway_of(client).services["svc"].targets[0]

    a.health_status = 503
    await eventually(lambda: not target.healthy)
    served = a.total
    down = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(20))
    assert (set(down), a.total) == ({200}, served)  # no traffic while down

    a.health_status = 200
    await eventually(lambda: target.healthy)
    up = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(20))
    assert (set(up), a.total) == ({200}, served + 10)


async def test_a_probe_slower_than_its_timeout_fails(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a = Target("a")
    (url,) = await serve(aiohttp_server, a)
    check = "{path: /delay/500, interval: 20ms, timeout: 50ms, unhealthy_threshold: 1}"
    client = await make_gateway(one_service(f"[{url}]", health_check=check))

    await eventually(lambda: not gateway_of(client).services["svc"].targets[0].healthy)


async def test_every_target_down_is_a_503_problem_with_retry_after(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a, b = Target("a"), Target("b")
    url_a, url_b = await serve(aiohttp_server, a, b)
    client = await make_gateway(one_service(f"[{url_a}, {url_b}]", health_check=CHECK))
    service = gateway_of(client).services["svc"]
    a.health_status = b.health_status = 500

    await eventually(lambda: not service.has_available_target())
    async with client.get("/svc/x") as response:
        problem = await response.json(content_type="application/problem+json")

    assert (response.status, problem["status"]) == (503, 503)
    assert response.headers["Retry-After"] == "1"  # two 20 ms probes, rounded up
    assert a.total + b.total == 0


async def test_probe_tasks_stop_when_the_gateway_closes(aiohttp_server: AiohttpServer) -> None:
    a = Target("a")
    gateway = compile_gateway(TWO_SERVICES, a=await aiohttp_server(a.app()))
    gateway.health.sync(gateway.services.values())
    assert gateway.health.watched == {"svc", "other"}  # "passive" has no health_check
    await eventually(lambda: a.probes >= 4)

    await gateway.close()

    assert gateway.health.watched == frozenset()
    assert probe_tasks() == {}


async def test_a_reload_that_removes_a_service_stops_its_probes(
    aiohttp_server: AiohttpServer,
) -> None:
    a = Target("a")
    server = await aiohttp_server(a.app())
    gateway = compile_gateway(TWO_SERVICES, a=server)
    gateway.health.sync(gateway.services.values())
    kept, removed = probe_tasks()["svc"], gateway.services["other"]
    await eventually(lambda: a.probes >= 2)
    without_other = TWO_SERVICES.replace(OTHER, "").replace(
        "  - {prefix: /other, service: other}\n", ""
    )

    reload(gateway, without_other, url_of(server))

    assert gateway.health.watched == {"svc"}
    await eventually(lambda: set(probe_tasks()) == {"svc"})
    assert probe_tasks()["svc"] is kept  # an unchanged service keeps probing undisturbed
    await eventually(lambda: removed.closed)  # and the removed one's pool is closed
    await gateway.close()


@pytest.mark.parametrize(
    "new_other",
    [
        "{targets: [$A], health_check: {path: /healthz, interval: 30ms}}",
        "{targets: [$A], health_check: {path: /healthz, interval: 20ms}, retries: 1}",
    ],
    ids=["health-check-changed", "other-setting-changed"],
)
async def test_a_reload_that_changes_a_service_restarts_its_probes(
    new_other: str, aiohttp_server: AiohttpServer
) -> None:
    a = Target("a")
    server = await aiohttp_server(a.app())
    gateway = compile_gateway(TWO_SERVICES, a=server)
    gateway.health.sync(gateway.services.values())
    before, old_other = probe_tasks(), gateway.services["other"]

    reload(gateway, TWO_SERVICES.replace(OTHER, f"  other: {new_other}\n"), url_of(server))

    assert gateway.health.watched == {"svc", "other"}
    await eventually(lambda: before["other"].done())
    after = probe_tasks()
    assert after["svc"] is before["svc"]
    assert after["other"] is not before["other"]  # a new task, probing the new Service
    await eventually(lambda: old_other.closed)
    await gateway.close()


async def test_probes_do_not_wait_for_a_slot_in_a_full_traffic_pool(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a = Target("a", "hang")  # its requests (think: two SSE streams) hold their connections
    (url,) = await serve(aiohttp_server, a)
    check = "{path: /healthz, interval: 20ms, timeout: 200ms, unhealthy_threshold: 1}"
    client = await make_gateway(one_service(f"[{url}]", max_connections="2", health_check=check))
    target = gateway_of(client).services["svc"].targets[0]
    streams = [asyncio.create_task(status(client, "GET", "/svc/stream")) for _ in range(2)]
    await eventually(lambda: a.total == 2)
    probed = a.probes

    await eventually(lambda: a.probes >= probed + 5)

    assert target.healthy
    a.release.set()
    assert await asyncio.gather(*streams) == [200, 200]


async def test_an_error_in_a_probe_round_is_logged_and_probing_goes_on(
    make_gateway: MakeGateway,
    aiohttp_server: AiohttpServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_judge, calls = health.judge, [0]

    def judge_with_a_bug_once(*args: Any) -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug in judge")
        return real_judge(*args)

    monkeypatch.setattr(health, "judge", judge_with_a_bug_once)
    a = Target("a")
    (url,) = await serve(aiohttp_server, a)
    client = await make_gateway(one_service(f"[{url}]", health_check=CHECK))
    target = gateway_of(client).services["svc"].targets[0]

    await eventually(lambda: calls[0] >= 3)  # the rounds after the failed one ran
    a.health_status = 503
    await eventually(lambda: not target.healthy)

    failures = [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
    assert len(failures) == 1
    assert "svc" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], RuntimeError)
