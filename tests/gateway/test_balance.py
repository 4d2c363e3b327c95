"""Target choice: smooth weighted round robin (exact shares, state kept across outages) and
least connections (a stuck target is avoided), as units and through real loopback targets."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from gateway.config.model import CircuitBreakerConfig, TargetConfig
from gateway.upstream.balance import LeastConn, RoundRobin
from gateway.upstream.breaker import CircuitBreaker
from gateway.upstream.service import Target
from tests.gateway.conftest import MakeGateway
from tests.polling import eventually
from tests.resilience_upstreams import Target as Upstream
from tests.resilience_upstreams import in_batches, one_service, serve, status


def targets(*weights: int) -> list[Target]:
    return [
        Target(
            TargetConfig(f"http://t{i}", weight),
            f"svc#{i}",
            CircuitBreaker(f"svc#{i}", CircuitBreakerConfig()),
        )
        for i, weight in enumerate(weights)
    ]


def labels(picked: Sequence[Target]) -> str:
    return " ".join(t.label[-1] for t in picked)


def test_smooth_round_robin_interleaves_heavy_and_light_targets() -> None:
    pool = targets(5, 1, 1)
    balancer = RoundRobin()

    picked = [balancer.pick(pool) for _ in range(14)]

    assert labels(picked) == " ".join(["0 0 1 0 2 0 0"] * 2)  # nginx's sequence, twice


def test_round_robin_with_equal_weights_alternates() -> None:
    pool = targets(1, 1, 1)
    balancer = RoundRobin()

    assert labels([balancer.pick(pool) for _ in range(6)]) == "0 1 2 0 1 2"


@settings(max_examples=300, deadline=None, derandomize=True)  # same cases every run
@given(
    weights=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    outages=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), max_size=60),
)
def test_round_robin_state_stays_fair_when_targets_leave_and_come_back(
    weights: list[int], outages: list[list[bool]]
) -> None:
    pool = targets(*weights)
    balancer = RoundRobin()
    total = sum(weights)
    for up in outages:  # each pick sees only the targets that are up then
        candidates = [t for t, ok in zip(pool, up, strict=False) if ok] or pool[:1]
        balancer.pick(candidates)
        assert sum(t.current_weight for t in pool) == 0
        assert all(abs(t.current_weight) < total for t in pool)

    counts = Counter(balancer.pick(pool).label for _ in range(3 * total))  # all back

    for target in pool:
        assert abs(counts[target.label] - 3 * target.config.weight) <= 1


def test_least_conn_picks_fewest_in_flight_relative_to_weight() -> None:
    light, heavy = targets(1, 3)
    light.in_flight, heavy.in_flight = 1, 2  # 1/1 busier than 2/3

    assert LeastConn().pick([light, heavy]) is heavy


def test_least_conn_rotates_between_equally_loaded_targets() -> None:
    pool = targets(1, 1, 1)
    balancer = LeastConn()

    assert {balancer.pick(pool).label for _ in range(3)} == {"svc#0", "svc#1", "svc#2"}


async def test_weights_three_to_one_split_a_thousand_requests_exactly(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a, b = Upstream("a"), Upstream("b")
    url_a, url_b = await serve(aiohttp_server, a, b)
    routes = one_service(f"[{{url: {url_a}, weight: 3}}, {{url: {url_b}}}]")
    client = await make_gateway(routes)

    got = await in_batches((lambda: status(client, "GET", "/svc/x") for _ in range(1000)), 20)

    assert set(got) == {200}
    assert (a.total, b.total) == (750, 250)


async def answered_or_stuck(task: asyncio.Task[int], stuck: Upstream, before: int) -> None:
    await eventually(lambda: task.done() or stuck.total > before)


async def test_least_conn_sends_new_requests_away_from_a_stuck_target(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    stuck, fine = Upstream("stuck", "hang"), Upstream("fine")
    url_a, url_b = await serve(aiohttp_server, stuck, fine)
    client = await make_gateway(one_service(f"[{url_a}, {url_b}]", balance="least_conn"))
    hanging: list[asyncio.Task[int]] = []

    for _ in range(30):  # one at a time: each waits until it is answered or stuck
        before = stuck.total
        task = asyncio.create_task(status(client, "GET", "/svc/x"))
        await answered_or_stuck(task, stuck, before)
        if not task.done():
            hanging.append(task)
        else:
            assert task.result() == 200

    assert (stuck.total, fine.total) == (1, 29)
    stuck.release.set()
    assert await asyncio.gather(*hanging) == [200]


async def test_round_robin_keeps_sending_to_a_stuck_target(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    stuck, fine = Upstream("stuck", "hang"), Upstream("fine")
    url_a, url_b = await serve(aiohttp_server, stuck, fine)
    client = await make_gateway(one_service(f"[{url_a}, {url_b}]"))

    requests = [asyncio.create_task(status(client, "GET", "/svc/x")) for _ in range(10)]
    await eventually(lambda: stuck.total + fine.total == 10)
    stuck.release.set()

    assert await asyncio.gather(*requests) == [200] * 10
    assert stuck.total == 5  # the contrast with least_conn above
