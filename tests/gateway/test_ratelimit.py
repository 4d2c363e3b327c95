"""Rate limits in one process with the memory store: the bucket arithmetic on an injected
clock, bounded memory, keys, the §9 headers and the 429 (CONTRACT §9)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config.build import load_text
from gateway.config.model import RateLimitPolicy
from gateway.config.redisurl import parse_sentinel, redis_url_problem
from gateway.http.exchange import Exchange
from gateway.ratelimit.bucket import decided, step, take
from gateway.ratelimit.keys import HeaderMaker, policy_text, subject_of
from gateway.ratelimit.memory import MemoryStore
from tests.gateway.conftest import MakeGateway

SECOND = 1_000_000  # the clock is in microseconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * SECOND

    def __call__(self) -> int:
        return self.now


def test_a_full_bucket_admits_exactly_burst_then_one_per_interval() -> None:
    policy = RateLimitPolicy(limit=10, per=1.0, burst=3)  # a token every 100 ms
    store, clock = MemoryStore(FakeClock()), None
    clock = store._clock
    assert isinstance(clock, FakeClock)
    decisions = [store.take("k", policy) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[2].reset == pytest.approx(0.3)  # full again in three intervals
    assert decisions[3].retry_after == pytest.approx(0.1)  # one token back in one interval
    clock.now += 99_999
    assert not store.take("k", policy).allowed
    clock.now += 1
    assert store.take("k", policy).allowed
    clock.now += 10 * SECOND  # long idle: full again, never more than burst
    assert [store.take("k", policy).allowed for _ in range(4)] == [True, True, True, False]


def test_burst_defaults_to_limit_and_a_limit_that_does_not_divide_per_stays_exact() -> None:
    policy = RateLimitPolicy(limit=7, per=60.0)
    assert policy.burst == 7
    tat, now = None, 5 * SECOND
    admitted = 0
    for _ in range(20):
        tat, decision = take(tat, now, policy)
        admitted += decision.allowed
    assert admitted == 7


def test_idle_buckets_are_evicted_once_full_again() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    policy = RateLimitPolicy(limit=1, per=1.0)  # one take: full again 1 s later
    for i in range(1000):
        store.take(f"client-{i}", policy)
    assert len(store) == 1000
    clock.now += SECOND // 2
    store.take("fresh", policy)
    assert len(store) == 1001  # not full yet: kept
    clock.now += SECOND // 2 + 1
    store.take("another", policy)  # a new key sweeps every full bucket away
    assert len(store) == 2
    clock.now += 2 * SECOND
    store.evict_idle()
    assert len(store) == 0


def test_a_key_spraying_client_cannot_grow_the_store_past_its_cap() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, max_keys=500)
    policy = RateLimitPolicy(limit=1, per=3600.0)  # buckets stay non-full for an hour
    for i in range(5000):
        store.take(f"spray-{i}", policy)
    assert len(store) == 500
    assert store.take("spray-4999", policy).allowed is False  # the newest are the ones kept


def test_keys_name_what_they_are_and_fall_back_to_the_client_address() -> None:
    exchange = Exchange("id", "tp", client="10.0.0.9")
    assert subject_of("ip")(exchange, {}) == "ip:10.0.0.9"
    assert subject_of("consumer")(exchange, {}) == "ip:10.0.0.9"  # anonymous
    exchange.consumer = "10.0.0.9"
    assert subject_of("consumer")(exchange, {}) == "consumer:10.0.0.9"  # never the ip's bucket
    header = subject_of("header:X-Api-Client")
    assert header(exchange, {"X-Api-Client": "app-1"}) == "header:app-1"
    assert header(exchange, {}) == "ip:10.0.0.9"


def test_the_policy_header_says_limit_and_window_and_burst_only_when_it_differs() -> None:
    assert policy_text(RateLimitPolicy(100, 60.0)) == "100;w=60"
    assert policy_text(RateLimitPolicy(100, 60.0, burst=10)) == "100;w=60;burst=10"
    assert policy_text(RateLimitPolicy(5, 0.5)) == "5;w=0.5"
    headers = dict(HeaderMaker(RateLimitPolicy(100, 60.0, burst=10)).headers(
        take(None, 0, RateLimitPolicy(100, 60.0, burst=10))[1]
    ))  # fmt: skip
    assert headers == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "9",
        "RateLimit-Reset": "1",  # one 0.6 s interval, rounded up
        "RateLimit-Policy": "100;w=60;burst=10",
    }


def test_the_headers_of_an_admitted_take_are_the_same_made_from_its_answer_or_decision() -> None:
    policy = RateLimitPolicy(limit=7, per=3.0, burst=4)  # an interval that is not whole ms
    clock = FakeClock()
    answers, decisions = MemoryStore(clock).taker(policy), MemoryStore(clock)
    maker = HeaderMaker(policy)
    for _ in range(6):
        answer, decision = answers("k"), decisions.take("k", policy)
        assert (answer > 0) == decision.allowed
        if decision.allowed:
            assert maker.admitted(answer) == maker.headers(decision)
        clock.now += 123_457


def test_the_memory_take_is_the_bucket_arithmetic_and_a_full_bucket_has_its_headers_made() -> None:
    policy = RateLimitPolicy(limit=5, per=2.0, burst=3)
    clock = FakeClock()
    take, maker = MemoryStore(clock).taker(policy), HeaderMaker(policy)
    tat: int | None = None
    gaps = [0, 0, 0, 0, 1, 399_999, 1, 400_000, 5 * SECOND, 0, 123_457, 0, 0, 0, 2 * SECOND]
    for gap in gaps * 3:
        clock.now += gap
        tat, expected = step(tat, clock.now, policy.interval_us, policy.capacity_us)
        answer = take("k")
        assert answer == expected
        if answer > 0:
            assert maker.admitted(answer) == maker.headers(decided(answer, policy))
    full = maker.headers(decided(policy.interval_us, policy))
    assert maker.full == full
    assert dict(full)["RateLimit-Remaining"] == "2"


BASE = """
version: 1
services:
  echo: {targets: ["http://127.0.0.1:8001"]}
"""


def _config_errors(text: str) -> list[str]:
    return [str(e) for e in load_text(BASE + text, "routes.yaml", environ={}).errors]


def test_rate_limit_and_store_compile_with_units_and_defaults() -> None:
    text = (
        "store: {redis: 'redis://127.0.0.1:1/0', timeout: 20ms, on_store_error: deny}\n"
        "routes:\n  - {prefix: /a, service: echo, rate_limit: {limit: 100, per: 1m}}\n"
        "  - {prefix: /b, service: echo, rate_limit: {limit: 5, per: 1s, key: consumer, "
        "burst: 2}}\n"
    )
    config = load_text(BASE + text, "routes.yaml", environ={}).config
    assert config is not None
    a, b = (r.rate_limit for r in config.routes)
    assert a == RateLimitPolicy(100, 60.0, "ip", 100)
    assert a.interval_us == 600_000
    assert b == RateLimitPolicy(5, 1.0, "consumer", 2)
    assert b.capacity_us == 400_000
    store = config.rate_limit_store
    assert (store.redis, store.timeout, store.on_store_error) == (
        "redis://127.0.0.1:1/0",
        0.02,
        "deny",
    )
    unset = load_text(BASE + "store: {redis: ''}\nroutes: [{prefix: /, service: echo}]\n",
                      "routes.yaml", environ={}).config  # fmt: skip
    assert unset is not None
    assert unset.rate_limit_store.redis is None  # ${REDIS_URL:-} unset: memory
    assert unset.rate_limit_store.timeout == 0.05
    assert unset.rate_limit_store.on_store_error == "allow"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rate_limit: {limit: 0, per: 1m}", "routes.0.rate_limit.limit: must be at least 1"),
        ("rate_limit: {limit: 1, per: 1m, key: user}", "must be ip, consumer or header:NAME"),
        ("rate_limit: {limit: 1, per: 1m, burst: 0}", "rate_limit.burst: must be at least 1"),
        ("rate_limit: {limit: 1}", "routes.0.rate_limit: missing required key 'per'"),
        ("rate_limit: {limit: 1, per: 1m, window: 1s}", "unknown key 'window'"),
    ],
)
def test_bad_rate_limits_are_reported_at_their_key(text: str, message: str) -> None:
    errors = _config_errors(f"routes:\n  - {{prefix: /a, service: echo, {text}}}\n")
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:6379", "the scheme must be one of redis, rediss, unix"),
        ("redis://:secret@:6379/0", "it names no host"),
        ("redis://h:99999/0", "check the port"),
        ("redis://h:6379/zero", "the path must be a database number"),
        ("redis+sentinel://h:26379", "Sentinel URLs take the form"),
        ("redis+sentinel://h/mymaster", "each sentinel must be HOST:PORT"),
        ("redis+sentinel://h:1/m/x", "the database must be a number"),
    ],
)
def test_bad_redis_urls_are_reported_without_quoting_them(url: str, message: str) -> None:
    text = f"store: {{redis: '{url}'}}\nroutes: [{{prefix: /, service: echo}}]\n"
    errors = _config_errors(text)
    assert any("store.redis: bad Redis URL: " in e and message in e for e in errors), errors
    assert not any("secret" in e for e in errors)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://user:pw@redis.example:6380/2", "unix:///run/r.sock",
     "redis+sentinel://s1:26379,s2:26379/mymaster/0", "rediss+sentinel://:pw@[::1]:26379/m"],
)  # fmt: skip
def test_plain_tls_unix_and_sentinel_urls_are_accepted(url: str) -> None:
    assert redis_url_problem(url) is None


def test_a_sentinel_url_names_its_sentinels_master_database_and_tls() -> None:
    where = parse_sentinel("rediss+sentinel://app:p%40ss@s1:26379,[::1]:26380/mymaster/3")
    assert where.sentinels == (("s1", 26379), ("::1", 26380))
    assert (where.master, where.db, where.tls) == ("mymaster", 3, True)
    assert (where.username, where.password) == ("app", "p@ss")


# --- through the gateway -------------------------------------------------------------------

LIMITED = """
version: 1
trusted_proxies: [127.0.0.1/32]
services:
  echo: {targets: [$ECHO]}
  dead: {targets: ["http://127.0.0.1:9"]}
routes:
  - prefix: /limited
    service: echo
    rate_limit: {limit: 1, per: 1h, burst: 5}
  - prefix: /other
    service: echo
    rate_limit: {limit: 1, per: 1h, burst: 5}
  - prefix: /by-header
    service: echo
    rate_limit: {limit: 1, per: 1h, burst: 2, key: "header:X-Api-Client"}
  - prefix: /dead
    service: dead
    rate_limit: {limit: 10, per: 1m}
  - prefix: /free
    service: echo
"""


async def test_exactly_burst_of_twice_burst_concurrent_requests_pass(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(LIMITED)
    responses = await asyncio.gather(*(client.get("/limited/x") for _ in range(10)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 5 + [429] * 5
    remaining = sorted(int(r.headers["RateLimit-Remaining"]) for r in responses if r.status == 200)
    assert remaining == [0, 1, 2, 3, 4]


async def test_a_refused_request_is_a_429_problem_with_retry_after_and_the_headers(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(LIMITED)
    for _ in range(5):
        ok = await client.get("/limited/x")
        assert ok.status == 200
        assert ok.headers["RateLimit-Limit"] == "5"
        assert ok.headers["RateLimit-Policy"] == "1;w=3600;burst=5"
    refused = await client.get("/limited/x", data=b"never read")
    assert refused.status == 429
    assert refused.content_type == "application/problem+json"
    problem = json.loads(await refused.text())
    assert problem["status"] == 429
    assert problem["type"].endswith("/rate-limited")
    assert refused.headers["Retry-After"] == "3600"  # one token per hour
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Reset"] == "18000"  # five hours to full
    free = await client.get("/free/x")
    assert "RateLimit-Limit" not in free.headers


async def test_every_answer_of_a_limited_route_carries_the_headers_errors_included(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(LIMITED)
    failed = await client.get("/dead/x")
    assert failed.status == 502
    assert failed.headers["RateLimit-Remaining"] == "9"
    assert failed.headers["RateLimit-Policy"] == "10;w=60"


async def test_keys_isolate_routes_clients_and_header_values(make_gateway: MakeGateway) -> None:
    client = await make_gateway(LIMITED)
    for _ in range(5):
        assert (await client.get("/limited/x")).status == 200
    assert (await client.get("/limited/x")).status == 429
    assert (await client.get("/other/x")).status == 200  # another route, another bucket
    proxied = {"X-Forwarded-For": "203.0.113.7"}  # from a trusted proxy: another client
    assert (await client.get("/limited/x", headers=proxied)).status == 200
    for name in ("app-1", "app-2"):
        for _ in range(2):
            ok = await client.get("/by-header/x", headers={"X-Api-Client": name})
            assert ok.status == 200
        refused = await client.get("/by-header/x", headers={"X-Api-Client": name})
        assert refused.status == 429
    assert (await client.get("/by-header/x")).status == 200  # no header: the client's bucket


async def test_buckets_survive_a_reload_that_keeps_the_route(make_gateway: MakeGateway) -> None:
    client = await make_gateway(LIMITED)
    for _ in range(5):
        await client.get("/limited/x")
    gateway = client.server.gateway  # type: ignore[attr-defined]
    gateway.swap(gateway.config)
    assert (await client.get("/limited/x")).status == 429
