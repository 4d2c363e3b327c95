"""Service.send against real loopback targets that die, fail, reset, hang and come back:
retries (which, where, how many), the retry budget, timeouts and the per-request target."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import unused_port
from pytest_aiohttp import AiohttpServer

from gateway.config.model import CircuitBreakerConfig, ServiceConfig, TargetConfig
from gateway.upstream.breaker import Circuit
from gateway.upstream.service import Service
from tests.gateway.conftest import GatewayClient, MakeGateway, base_url
from tests.polling import eventually
from tests.resilience_upstreams import (
    Mode,
    Target,
    gateway_of,
    in_batches,
    one_service,
    serve,
    status,
)


async def start(aiohttp_server: AiohttpServer, *modes: Mode) -> list[tuple[Target, str]]:
    """Targets a, b, ... in these modes, each with its server's base URL."""
    targets = [Target(name, mode) for name, mode in zip("abcd", modes, strict=False)]
    return list(zip(targets, await serve(aiohttp_server, *targets), strict=True))


async def gateway(make_gateway: MakeGateway, urls: list[str], **settings: str) -> GatewayClient:
    return await make_gateway(one_service("[" + ", ".join(urls) + "]", **settings))


def circuit_of(client: GatewayClient, index: int = 0) -> Circuit:
    return gateway_of(client).services["svc"].targets[index].breaker.state


async def chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 100):
        yield b"p" * 100


async def test_get_clients_see_no_5xx_when_a_target_dies_mid_run(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a, b = Target("a"), Target("b")
    server_a = await aiohttp_server(a.app())
    client = await gateway(
        make_gateway, [base_url(server_a), base_url(await aiohttp_server(b.app()))], retries="1"
    )

    before = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(100))
    kill = asyncio.create_task(server_a.close())  # stops while requests are in flight
    during = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(40))
    await kill
    after = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(160))

    assert set(before + during + after) == {200}
    assert a.total + b.total == 300  # a failed attempt never reached a handler: none ran twice
    assert circuit_of(client) is Circuit.OPEN


async def test_a_target_that_restarts_rejoins_after_its_circuit_trial(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a, b = Target("a"), Target("b")
    server_a = await aiohttp_server(a.app())
    port = server_a.port
    client = await gateway(
        make_gateway,
        [base_url(server_a), base_url(await aiohttp_server(b.app()))],
        retries="1",
        circuit_breaker="{failures: 1, open_for: 200ms}",
    )
    await server_a.close()

    assert {await status(client, "GET", "/svc/x") for _ in range(4)} == {200}
    assert circuit_of(client) is Circuit.OPEN
    await aiohttp_server(a.app(), port=port)  # the same target, back on its address
    served_before = a.total
    seen: set[int] = set()

    async def one_more() -> bool:
        seen.add(await status(client, "GET", "/svc/x"))
        return a.total > served_before

    for _ in range(500):  # poll by request, with a deadline: open_for is 200 ms
        if await one_more():
            break
        await asyncio.sleep(0.01)
    assert a.total > served_before
    assert seen == {200}
    assert circuit_of(client) is Circuit.CLOSED


@pytest.mark.parametrize("mode", ["fail", "reset"])
async def test_a_post_is_never_sent_twice(
    mode: Mode, make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, mode, mode)
    client = await gateway(
        make_gateway, [url_a, url_b], retries="3", circuit_breaker="{failures: 1000}"
    )

    posts = await in_batches(lambda: status(client, "POST", "/svc/x", b"body") for _ in range(20))
    got = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(20))

    assert set(posts) == {503 if mode == "fail" else 502}
    assert a.hits["POST"] + b.hits["POST"] == 20
    assert set(got) == set(posts)
    assert a.hits["GET"] + b.hits["GET"] > 20  # the same failures are retried for a GET


@pytest.mark.parametrize(
    ("route_limit", "chunked"),
    [("", False), ("", True), ("limits: {max_body_bytes: 100000}\n", True)],
    ids=["content-length", "chunked", "chunked-under-a-body-limit"],
)
async def test_a_post_goes_to_another_target_when_the_connection_is_refused(
    route_limit: str, chunked: bool, make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    ((a, url_a),) = await start(aiohttp_server, "ok")
    dead = f"http://127.0.0.1:{unused_port()}"
    routes = one_service(f"[{dead}, {url_a}]", retries="1") + route_limit
    client = await make_gateway(routes)

    for _ in range(6):
        body: object = chunks(1000) if chunked else b"p" * 1000
        assert await status(client, "POST", "/svc/x", body) == 200

    assert a.hits["POST"] == 6
    assert a.bodies == [1000] * 6  # the body went whole to the target that answered


async def test_a_small_put_body_is_sent_again_to_another_target_after_a_503(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, "fail", "ok")
    client = await gateway(
        make_gateway, [url_a, url_b], retries="1", circuit_breaker="{failures: 1000}"
    )

    puts = [await status(client, "PUT", "/svc/x", b"q" * 5000) for _ in range(6)]

    assert set(puts) == {200}
    assert b.hits["PUT"] == 6
    assert a.hits["PUT"] == 3
    assert set(a.bodies + b.bodies) == {5000}


async def test_a_chunked_put_streams_once_and_is_not_retried(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, "fail", "ok")
    client = await gateway(
        make_gateway, [url_a, url_b], retries="1", circuit_breaker="{failures: 1000}"
    )

    puts = [await status(client, "PUT", "/svc/x", chunks(1000)) for _ in range(6)]

    assert sorted(puts) == [200, 200, 200, 503, 503, 503]
    assert a.hits["PUT"] + b.hits["PUT"] == 6


async def test_a_failed_get_is_retried_on_the_other_target(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, "fail", "ok")
    client = await gateway(
        make_gateway,
        [url_a, url_b],
        retries="2",
        circuit_breaker="{failures: 1000}",
        retry_budget="{min_retries: 100}",  # every other request needs a retry here
    )

    got = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(40))

    assert set(got) == {200}
    assert b.hits["GET"] == 40  # each request answered once, by b
    assert a.hits["GET"] == 20  # and never tried twice on a


async def test_the_retry_budget_caps_upstream_requests_when_every_target_fails(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, "fail", "fail")
    client = await gateway(
        make_gateway,
        [url_a, url_b],
        retries="3",
        retry_budget="{ratio: 0.2, window: 10s, min_retries: 3}",
        circuit_breaker="{failures: 100000}",
    )

    got = await in_batches(lambda: status(client, "GET", "/svc/x") for _ in range(200))

    assert set(got) == {503}
    assert 200 < a.total + b.total <= 200 * 1.2 + 3  # not 800
    service = gateway_of(client).services["svc"]
    await eventually(lambda: all(t.in_flight == 0 for t in service.targets))


async def test_a_read_timeout_is_a_504_and_is_not_retried(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, "ok", "ok")
    client = await gateway(make_gateway, [url_a, url_b], retries="2", timeouts="{read: 100ms}")

    async with client.get("/svc/delay/400") as response:
        problem = await response.json(content_type="application/problem+json")

    assert response.status == 504
    assert problem["status"] == 504
    assert a.delayed + b.delayed == 1


@pytest.mark.parametrize("timeouts", ["{read: 100ms}", "{total: 150ms}"])
async def test_a_route_timeout_override_gives_504_on_that_route_only(
    timeouts: str, make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    ((_, url_a),) = await start(aiohttp_server, "ok")
    routes = one_service(f"[{url_a}]") + (
        f"  - {{prefix: /short, service: svc, strip_prefix: true, timeouts: {timeouts}}}\n"
    )
    client = await make_gateway(routes)

    short, normal = await asyncio.gather(
        status(client, "GET", "/short/delay/400"), status(client, "GET", "/svc/delay/400")
    )

    assert (short, normal) == (504, 200)


async def test_the_access_log_names_the_target_that_answered(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    (_, url_a), (_, url_b) = await start(aiohttp_server, "ok", "ok")
    client = await gateway(make_gateway, [url_a, url_b])
    answered = {}
    for i in range(4):
        async with client.get("/svc/x", headers={"X-Request-ID": f"req-{i}"}) as response:
            answered[f"req-{i}"] = (await response.json())["target"]

    def logged() -> dict[str, object]:
        batches = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
        lines = [json.loads(line) for batch in batches for line in batch.splitlines()]
        return {str(line["request_id"]): line["target"] for line in lines}

    await eventually(lambda: len(logged()) == 4)
    labels = {"a": "svc#0", "b": "svc#1"}
    assert logged() == {rid: labels[name] for rid, name in answered.items()}


async def test_a_client_leaving_mid_body_gives_back_the_in_flight_count(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    client = await make_gateway(one_service("[$TOOLS]", balance="least_conn"))
    target = gateway_of(client).services["svc"].targets[0]

    response = await client.get("/svc/stream?mib=64")
    await response.content.readexactly(65536)
    assert target.in_flight == 1
    response.close()  # drop the connection with most of the body unread

    await eventually(lambda: target.in_flight == 0)


async def test_a_cancelled_request_gives_back_its_count_and_its_half_open_trial(
    aiohttp_server: AiohttpServer,
) -> None:
    ((a, url_a),) = await start(aiohttp_server, "hang")
    now = [0.0]
    breaker_config = CircuitBreakerConfig(failures=1, open_for=10.0)
    config = ServiceConfig("svc", (TargetConfig(url_a),), circuit_breaker=breaker_config)
    service = Service(config, clock=lambda: now[0])
    target = service.targets[0]
    target.breaker.failure()
    now[0] = 10.0  # open_for has passed: the next request is the trial

    send = asyncio.create_task(service.send("GET", "/x", [], None))
    await eventually(lambda: a.total == 1)
    assert (target.breaker.state, target.available(), target.in_flight) == (
        Circuit.HALF_OPEN,
        False,  # one trial at a time
        1,
    )
    send.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await send

    assert (target.available(), target.in_flight) == (True, 0)  # the next request tries
    a.release.set()
    await service.close()


async def test_a_full_pool_is_a_503_at_once_and_is_never_retried(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    (a, url_a), (b, url_b) = await start(aiohttp_server, "hang", "hang")
    client = await gateway(
        make_gateway,
        [url_a, url_b],
        max_connections="1",
        retries="1",
        timeouts="{connect: 1s}",
        circuit_breaker="{failures: 1}",
    )
    held = asyncio.create_task(status(client, "GET", "/svc/held"))
    await eventually(lambda: a.total + b.total == 1)

    started = asyncio.get_running_loop().time()
    async with client.get("/svc/crowded") as response:
        problem = await response.json(content_type="application/problem+json")
    took = asyncio.get_running_loop().time() - started

    assert (response.status, response.headers["Retry-After"]) == (503, "1")
    assert problem["title"] == "Service Unavailable"
    assert took < 0.5  # not the 1 s connect timeout, let alone two of them
    assert a.total + b.total == 1
    registry = gateway_of(client).metrics.registry
    assert not registry.get_sample_value("gateway_upstream_retries_total", {"service": "svc"})
    a.release.set()
    b.release.set()
    assert await held == 200
    assert {circuit_of(client, 0), circuit_of(client, 1)} == {Circuit.CLOSED}
