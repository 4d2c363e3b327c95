"""The circuit breaker and the retry budget on a fake clock, then the breaker through the
gateway: a half-open trial brings a target back, and every circuit open is a 503."""

from __future__ import annotations

import asyncio

import pytest
from pytest_aiohttp import AiohttpServer

from gateway.config.model import CircuitBreakerConfig, RetryBudgetConfig
from gateway.upstream.breaker import (
    NOT_LET_THROUGH,
    AlwaysClosed,
    Circuit,
    CircuitBreaker,
    RetryBudget,
    worker_count,
)
from tests.gateway.conftest import MakeGateway
from tests.resilience_upstreams import Target, gateway_of, one_service, serve, status


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breaker(clock: FakeClock, failures: int = 3, open_for: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker("svc#0", CircuitBreakerConfig(failures, open_for), clock)


def tripped(clock: FakeClock) -> CircuitBreaker:
    circuit = breaker(clock)
    for _ in range(3):
        circuit.failure()
    return circuit


def test_consecutive_failures_open_the_circuit(clock: FakeClock) -> None:
    circuit = breaker(clock)

    circuit.failure()
    circuit.failure()
    assert (circuit.state, circuit.allows()) == (Circuit.CLOSED, True)
    circuit.failure()

    assert (circuit.state, circuit.allows()) == (Circuit.OPEN, False)
    assert circuit.reopens_in() == 30.0


def test_claim_alone_says_whether_the_circuit_lets_a_request_through(clock: FakeClock) -> None:
    # Service.send's one-target path claims without asking allows() first.
    circuit = tripped(clock)
    assert circuit.claim() == NOT_LET_THROUGH  # open
    clock.now += 30.0
    trial = circuit.claim()
    assert trial != NOT_LET_THROUGH  # half-open: the trial
    assert circuit.is_trial(trial)
    assert circuit.claim() == NOT_LET_THROUGH  # its trial is in flight
    assert AlwaysClosed("lone", clock).claim() != NOT_LET_THROUGH


def test_a_success_between_failures_resets_the_count(clock: FakeClock) -> None:
    circuit = breaker(clock)

    for _ in range(5):
        circuit.failure()
        circuit.failure()
        circuit.success()

    assert (circuit.state, circuit.consecutive_failures) == (Circuit.CLOSED, 0)


def test_an_open_circuit_lets_one_trial_through_after_open_for(clock: FakeClock) -> None:
    circuit = tripped(clock)

    clock.now += 29.9
    assert not circuit.allows()
    clock.now += 0.1
    assert circuit.allows()
    assert circuit.is_trial(circuit.claim())  # this request is the trial

    assert circuit.state is Circuit.HALF_OPEN
    assert not circuit.allows()  # nobody else while it runs
    assert not circuit.is_trial(circuit.claim())


def test_a_successful_trial_closes_the_circuit(clock: FakeClock) -> None:
    circuit = tripped(clock)
    clock.now += 30
    trial = circuit.claim()

    circuit.success(trial)

    assert (circuit.state, circuit.allows()) == (Circuit.CLOSED, True)


def test_a_failed_trial_opens_the_circuit_for_another_open_for(clock: FakeClock) -> None:
    circuit = tripped(clock)
    clock.now += 30
    trial = circuit.claim()

    circuit.failure(trial)

    assert (circuit.state, circuit.reopens_in()) == (Circuit.OPEN, 30.0)
    clock.now += 29
    assert not circuit.allows()


def test_an_abandoned_trial_passes_to_the_next_request(clock: FakeClock) -> None:
    circuit = tripped(clock)
    clock.now += 30
    trial = circuit.claim()

    circuit.abandon(trial)

    assert (circuit.state, circuit.allows()) == (Circuit.HALF_OPEN, True)
    assert circuit.is_trial(circuit.claim())


def test_an_abandoned_request_that_was_not_the_trial_changes_nothing(clock: FakeClock) -> None:
    circuit = tripped(clock)
    sent_while_closed = breaker(clock).claim()
    clock.now += 30
    circuit.claim()

    circuit.abandon(sent_while_closed)

    assert not circuit.allows()


def test_a_trial_that_never_reports_back_passes_on_after_open_for(clock: FakeClock) -> None:
    circuit = tripped(clock)
    clock.now += 30
    circuit.claim()  # and its caller forgets it

    clock.now += 29
    assert not circuit.allows()
    clock.now += 1

    assert circuit.allows()
    assert circuit.is_trial(circuit.claim())


def test_late_answers_do_not_close_an_open_circuit(clock: FakeClock) -> None:
    circuit = breaker(clock)
    early = [circuit.claim() for _ in range(5)]
    for ticket in early[:3]:
        circuit.failure(ticket)
    assert circuit.state is Circuit.OPEN

    circuit.success(early[3])  # a request sent before the circuit opened answers now
    clock.now += 10
    circuit.failure(early[4])

    assert (circuit.state, circuit.reopens_in()) == (Circuit.OPEN, 20.0)


def test_a_late_failure_while_half_open_does_not_reopen_the_circuit(clock: FakeClock) -> None:
    circuit = breaker(clock)
    late = circuit.claim()  # sent while closed, and slow
    for _ in range(3):
        circuit.failure(circuit.claim())
    clock.now += 30
    trial = circuit.claim()

    circuit.failure(late)  # arrives while the trial is deciding

    assert (circuit.state, circuit.allows()) == (Circuit.HALF_OPEN, False)
    circuit.success(trial)
    assert circuit.state is Circuit.CLOSED


def test_a_late_success_while_half_open_does_not_close_the_circuit(clock: FakeClock) -> None:
    circuit = breaker(clock)
    late = circuit.claim()
    for _ in range(3):
        circuit.failure(circuit.claim())
    clock.now += 30
    trial = circuit.claim()

    circuit.success(late)

    assert circuit.state is Circuit.HALF_OPEN
    circuit.failure(trial)
    assert (circuit.state, circuit.reopens_in()) == (Circuit.OPEN, 30.0)


def test_a_trial_that_was_passed_on_no_longer_decides(clock: FakeClock) -> None:
    circuit = tripped(clock)
    clock.now += 30
    forgotten = circuit.claim()
    clock.now += 30  # undecided for another open_for: the next request is the trial
    trial = circuit.claim()

    circuit.success(forgotten)
    after_forgotten = circuit.state
    circuit.success(trial)

    assert (after_forgotten, circuit.state) == (Circuit.HALF_OPEN, Circuit.CLOSED)


def test_answers_from_before_the_circuit_closed_again_do_not_count(clock: FakeClock) -> None:
    circuit = breaker(clock)
    stale = [circuit.claim() for _ in range(3)]  # sent while closed, answered very late
    for _ in range(3):
        circuit.failure(circuit.claim())
    clock.now += 30
    circuit.success(circuit.claim())
    assert circuit.state is Circuit.CLOSED

    for ticket in stale:
        circuit.failure(ticket)

    assert (circuit.state, circuit.consecutive_failures) == (Circuit.CLOSED, 0)


def test_the_default_breaker_of_a_single_target_never_opens(clock: FakeClock) -> None:
    circuit = AlwaysClosed("svc#0", clock)

    for _ in range(100):
        circuit.failure(circuit.claim())

    assert (circuit.state, circuit.allows(), circuit.consecutive_failures) == (
        Circuit.CLOSED,
        True,
        100,
    )


def budget(clock: FakeClock, ratio: float = 0.2, min_retries: int = 3) -> RetryBudget:
    return RetryBudget(RetryBudgetConfig(ratio, 10.0, min_retries), clock)


def spend_all(retry_budget: RetryBudget) -> int:
    spent = 0
    while retry_budget.try_spend():
        spent += 1
    return spent


def test_the_budget_allows_min_retries_with_no_traffic(clock: FakeClock) -> None:
    assert spend_all(budget(clock)) == 3


def test_the_budget_adds_a_ratio_of_requests_to_min_retries(clock: FakeClock) -> None:
    retry_budget = budget(clock)
    for _ in range(100):
        retry_budget.record_request()

    assert spend_all(retry_budget) == 3 + 20


@pytest.mark.parametrize(("workers", "alone", "busy"), [(1, 3, 23), (2, 1, 11), (3, 1, 7)])
def test_n_workers_split_min_retries_and_each_adds_its_own_share_of_requests(
    clock: FakeClock, workers: int, alone: int, busy: int
) -> None:
    idle = RetryBudget(RetryBudgetConfig(0.2, 10.0, 3), clock, workers)
    loaded = RetryBudget(RetryBudgetConfig(0.2, 10.0, 3), clock, workers)
    for _ in range(100 // workers):  # each worker sees its 1/N of the requests
        loaded.record_request()

    assert spend_all(idle) == alone  # 3/N, rounded down: N workers never exceed 3 together
    assert spend_all(loaded) == busy


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 1), ("", 1), ("2", 2), ("0", 1), ("x", 1), ("8", 8)]
)
def test_the_worker_count_comes_from_gateway_workers(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int
) -> None:
    if value is None:
        monkeypatch.delenv("GATEWAY_WORKERS", raising=False)
    else:
        monkeypatch.setenv("GATEWAY_WORKERS", value)

    assert worker_count() == expected


def test_the_budget_forgets_requests_and_retries_outside_its_window(clock: FakeClock) -> None:
    retry_budget = budget(clock, min_retries=0)
    for _ in range(100):
        retry_budget.record_request()
    assert spend_all(retry_budget) == 20

    clock.now += 5  # half the window: the same requests and retries still count
    assert not retry_budget.try_spend()
    clock.now += 5.5  # the window has slid past both
    for _ in range(10):
        retry_budget.record_request()

    assert spend_all(retry_budget) == 2


async def test_a_half_open_trial_brings_a_target_back(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    target = Target("a", "fail")
    (url,) = await serve(aiohttp_server, target)
    client = await make_gateway(
        one_service(f"[{url}]", circuit_breaker="{failures: 2, open_for: 300ms}")
    )
    circuit = gateway_of(client).services["svc"].targets[0].breaker

    assert [await status(client, "GET", "/svc/x") for _ in range(3)] == [503, 503, 503]
    assert target.total == 2  # the third was answered by the gateway: circuit open
    target.mode = "ok"

    statuses = []
    for _ in range(300):  # poll by request, with a deadline: open_for is 300 ms
        statuses.append(await status(client, "GET", "/svc/x"))
        if statuses[-1] == 200:
            break
        await asyncio.sleep(0.01)

    assert statuses[-1] == 200
    assert set(statuses[:-1]) <= {503}
    assert target.total == 3  # exactly one trial reached the target
    assert circuit.state is Circuit.CLOSED


async def test_every_circuit_open_is_a_503_problem_with_retry_after(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    a, b = Target("a", "reset"), Target("b", "reset")
    urls = await serve(aiohttp_server, a, b)
    client = await make_gateway(
        one_service(f"[{', '.join(urls)}]", circuit_breaker="{failures: 1, open_for: 30s}")
    )

    assert [await status(client, "GET", "/svc/x") for _ in range(2)] == [502, 502]
    async with client.get("/svc/x") as response:
        problem = await response.json(content_type="application/problem+json")

    assert response.status == 503
    assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert problem["status"] == 503
    assert "svc" in problem["detail"]
    assert "127.0.0.1" not in problem["detail"]  # a problem never names an address
    assert (a.total, b.total) == (1, 1)


@pytest.mark.parametrize(
    ("breaker_setting", "expected"),
    [({}, [502] * 8), ({"circuit_breaker": "{failures: 5}"}, [502] * 5 + [503] * 3)],
    ids=["default-never-ejects", "explicit-fails-fast"],
)
async def test_a_single_target_is_ejected_only_by_an_explicit_circuit_breaker(
    breaker_setting: dict[str, str],
    expected: list[int],
    make_gateway: MakeGateway,
    aiohttp_server: AiohttpServer,
) -> None:
    target = Target("a", "reset")
    (url,) = await serve(aiohttp_server, target)
    client = await make_gateway(one_service(f"[{url}]", **breaker_setting))

    statuses = [await status(client, "GET", "/svc/x") for _ in range(8)]

    assert statuses == expected
    assert target.total == expected.count(502)  # a 503 never reached the target
    target.mode = "ok"
    if not breaker_setting:  # the target answers again: so does the route, at once
        assert await status(client, "GET", "/svc/x") == 200
