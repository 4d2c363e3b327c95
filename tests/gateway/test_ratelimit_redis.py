"""Rate limits on a real redis-server (a private one on a free port, or REDIS_URL): one
atomic script per check, keys that expire, and outages decided by on_store_error within
store.timeout (CONTRACT §9)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.config.model import RateLimitPolicy, RateLimitStoreConfig
from gateway.ratelimit.redisstore import RedisStore
from gateway.ratelimit.redisstore import client as redis_client
from gateway.runtime.state import Gateway
from tests.gateway.conftest import GatewayClient, MakeGateway
from tests.redis_server import RedisServer, stalled_server

ROUTES = """
version: 1
store: {{redis: "{url}", timeout: {timeout}, on_store_error: {on_error}}}
services:
  echo: {{targets: [$ECHO]}}
routes:
  - prefix: /limited-{ns}
    service: echo
    rate_limit: {{limit: 1, per: 1h, burst: {burst}}}
  - prefix: /other-{ns}
    service: echo
    rate_limit: {{limit: 1, per: 1h, burst: {burst}, key: "header:X-Api-Client"}}
"""


def routes(
    url: str, ns: str, *, burst: int = 5, timeout: str = "1s", on_error: str = "allow"
) -> str:
    return ROUTES.format(url=url, ns=ns, burst=burst, timeout=timeout, on_error=on_error)


def gateway_of(client: GatewayClient) -> Gateway:
    gateway: Gateway = client.server.gateway  # type: ignore[attr-defined]
    return gateway


def store_errors(client: GatewayClient) -> float:
    value: float = gateway_of(client).metrics.rate_limit_store_errors._value.get()
    return value


async def test_exactly_burst_of_twice_burst_concurrent_requests_pass_on_redis(
    make_gateway: MakeGateway, redis: RedisServer
) -> None:
    client = await make_gateway(routes(redis.url, redis.namespace, burst=20))
    path = f"/limited-{redis.namespace}/x"
    responses = await asyncio.gather(*(client.get(path) for _ in range(40)))
    assert sorted(r.status for r in responses) == [200] * 20 + [429] * 20
    remaining = sorted(int(r.headers["RateLimit-Remaining"]) for r in responses if r.status == 200)
    assert remaining == list(range(20))  # every check saw every other one: atomic
    assert all(r.headers["Retry-After"] == "3600" for r in responses if r.status == 429)


async def test_keys_isolate_routes_and_header_values_on_redis(
    make_gateway: MakeGateway, redis: RedisServer
) -> None:
    client = await make_gateway(routes(redis.url, redis.namespace, burst=2))
    limited, other = f"/limited-{redis.namespace}/x", f"/other-{redis.namespace}/x"
    assert [(await client.get(limited)).status for _ in range(3)] == [200, 200, 429]
    for name in ("app-1", "app-2"):
        statuses = [
            (await client.get(other, headers={"X-Api-Client": name})).status for _ in range(3)
        ]
        assert statuses == [200, 200, 429]


async def test_one_check_is_one_evalsha_on_the_servers_clock_and_buckets_expire(
    redis: RedisServer,
) -> None:
    policy = RateLimitPolicy(limit=10, per=1.0, burst=3)  # full again 300 ms after 3 takes
    store = RedisStore(RateLimitStoreConfig(redis=redis.url))
    probe = redis_client(redis.url, 2.0)
    key = f"rl:test-{redis.namespace}|ip:1"
    try:
        await store.hit(key, policy)  # loads the script once
        before = await probe.info("commandstats")
        decisions = [await store.hit(key, policy) for _ in range(3)]
        after = await probe.info("commandstats")
        calls = (
            after["cmdstat_evalsha"]["calls"] - before.get("cmdstat_evalsha", {"calls": 0})["calls"]
        )
        assert calls == 3
        assert [d.allowed for d in decisions] == [True, True, False]
        seconds, micros = await probe.time()
        tat = int(await probe.get("gateway:" + key))
        ahead = tat - (seconds * 1_000_000 + micros)
        assert 0 < ahead <= policy.capacity_us  # the TAT is on the server's clock
        ttl = await probe.pttl("gateway:" + key)
        assert 0 < ttl <= 300
        started = time.monotonic()
        while await probe.exists("gateway:" + key):  # expires on its own, when full again
            assert time.monotonic() - started < 2.0
            await asyncio.sleep(0.02)
        assert (await store.hit(key, policy)).remaining == 2  # absent is full
    finally:
        await store.close()
        await probe.aclose()


async def test_the_script_is_loaded_again_after_redis_forgets_it(redis: RedisServer) -> None:
    store = RedisStore(RateLimitStoreConfig(redis=redis.url))
    probe = redis_client(redis.url, 2.0)
    policy = RateLimitPolicy(limit=10, per=1.0)
    try:
        assert (await store.hit(f"rl:flush-{redis.namespace}", policy)).allowed
        await probe.script_flush()
        assert (await store.hit(f"rl:flush-{redis.namespace}", policy)).remaining == 8
    finally:
        await store.close()
        await probe.aclose()


async def test_checks_made_together_share_one_round_trip_and_stay_exact(
    redis: RedisServer,
) -> None:
    store = RedisStore(RateLimitStoreConfig(redis=redis.url))
    probe = redis_client(redis.url, 2.0)
    policy = RateLimitPolicy(limit=1, per=3600.0, burst=20)
    key = f"rl:batch-{redis.namespace}|ip:1"
    try:
        await probe.script_flush()  # the batch meets NOSCRIPT: the script is loaded once
        before = (await probe.info("stats"))["total_connections_received"]
        decisions = await asyncio.gather(*(store.hit(key, policy) for _ in range(40)))
        after = (await probe.info("stats"))["total_connections_received"]
        assert after - before == 1  # one batch on one connection, not a connection per check
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(20))
        assert sum(not d.allowed for d in decisions) == 20
    finally:
        await store.close()
        await probe.aclose()


@pytest.mark.parametrize(("on_error", "outage_status"), [("allow", 200), ("deny", 503)])
async def test_redis_killed_mid_test_is_decided_by_on_store_error_then_recovers(
    make_gateway: MakeGateway,
    redis: RedisServer,
    on_error: str,
    outage_status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not redis.owned:
        pytest.skip("kills and restarts Redis: needs a private redis-server, not REDIS_URL")
    client = await make_gateway(routes(redis.url, redis.namespace, burst=3, on_error=on_error))
    path = f"/limited-{redis.namespace}/x"
    assert (await client.get(path)).status == 200
    await redis.kill()
    with caplog.at_level(logging.INFO, logger="gateway.ratelimit"):
        during = [await client.get(path) for _ in range(5)]
        assert [r.status for r in during] == [outage_status] * 5
        assert all("RateLimit-Remaining" not in r.headers for r in during)  # nothing known
        if outage_status == 503:
            assert "rate-limit-unavailable" in await during[0].text()
        assert store_errors(client) == 5
        await redis.restart()  # same port, empty: the bucket starts full again
        statuses = [(await client.get(path)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # limits hold again, with no restart of ours
    outages = [
        r for r in caplog.records if "did not answer" in r.message or " failed " in r.message
    ]
    assert len(outages) == 1, [r.message for r in caplog.records]  # once, not per request
    assert sum("answers again" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(("on_error", "status"), [("allow", 200), ("deny", 503)])
async def test_a_redis_that_never_answers_costs_a_request_at_most_the_store_timeout(
    make_gateway: MakeGateway, on_error: str, status: int
) -> None:
    async with stalled_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        client = await make_gateway(routes(url, "stalled", timeout="100ms", on_error=on_error))
        for concurrent in (1, 10):
            started = time.monotonic()
            batch = [client.get("/limited-stalled/x") for _ in range(concurrent)]
            responses = await asyncio.gather(*batch)
            elapsed = time.monotonic() - started
            assert [r.status for r in responses] == [status] * concurrent
            assert elapsed < 0.1 + 0.4, elapsed  # the timeout, plus a loaded machine's slack
        assert store_errors(client) == 11


async def test_a_batch_mixing_keys_and_routes_gives_each_bucket_exactly_its_burst(
    redis: RedisServer,
) -> None:
    store = RedisStore(RateLimitStoreConfig(redis=redis.url))
    probe = redis_client(redis.url, 2.0)
    small = RateLimitPolicy(limit=1, per=3600.0, burst=3)
    large = RateLimitPolicy(limit=1, per=60.0, burst=5)
    keys = [f"rl:/{route}-{redis.namespace}|ip:{client}" for route in "ab" for client in (1, 2)]
    policies = {key: small if "/a-" in key else large for key in keys}
    # Interleaved so that keys and policies alternate within the one batch.
    checks = [key for _ in range(8) for key in keys]
    try:
        await store.hit(f"rl:warm-{redis.namespace}|ip:0", small)  # the script is loaded
        before = await probe.info("commandstats")
        decisions = await asyncio.gather(*(store.hit(key, policies[key]) for key in checks))
        after = await probe.info("commandstats")
        calls = after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"]
        assert calls == 1  # one script call for the whole batch
        for key in keys:
            mine = [d for k, d in zip(checks, decisions, strict=True) if k == key]
            burst = policies[key].burst
            assert [d.allowed for d in mine] == [True] * burst + [False] * (8 - burst)
            assert [d.remaining for d in mine[:burst]] == list(range(burst - 1, -1, -1))
            assert all(d.retry_after > 0 for d in mine[burst:])
    finally:
        await store.close()
        await probe.aclose()


async def test_checks_made_during_a_round_trip_go_together_in_the_next_one(
    redis: RedisServer,
) -> None:
    store = RedisStore(RateLimitStoreConfig(redis=redis.url))
    probe = redis_client(redis.url, 2.0)
    policy = RateLimitPolicy(limit=1, per=3600.0, burst=100)
    key = f"rl:follow-{redis.namespace}|ip:1"
    try:
        await store.hit(key, policy)  # the script is loaded, the connection made
        before = (await probe.info("commandstats"))["cmdstat_evalsha"]["calls"]
        first = asyncio.ensure_future(store.hit(key, policy))
        await asyncio.sleep(0)  # the first batch (one check) is on its way
        await asyncio.sleep(0)
        followers = [asyncio.ensure_future(store.hit(key, policy)) for _ in range(30)]
        decisions = await asyncio.gather(first, *followers)
        after = (await probe.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert after - before == 2  # the first, then the thirty together
        assert sorted(d.remaining for d in decisions) == list(range(68, 99))
    finally:
        await store.close()
        await probe.aclose()


async def test_a_round_trip_cut_by_the_timeout_never_answers_a_later_check(
    redis: RedisServer,
) -> None:
    """Redis stalls with a check in flight: it times out, and when Redis answers again a
    later check gets its own answer, not the late reply of the abandoned one."""
    if not redis.owned:
        pytest.skip("pauses Redis: needs a private redis-server, not REDIS_URL")
    store = RedisStore(RateLimitStoreConfig(redis=redis.url, timeout=0.1))
    policy = RateLimitPolicy(limit=1, per=3600.0, burst=10)
    used, fresh = f"rl:used-{redis.namespace}|ip:1", f"rl:fresh-{redis.namespace}|ip:1"
    try:
        for _ in range(5):
            await store.hit(used, policy)  # its next answer would say 4 remaining
        redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await store.hit(used, policy)
            assert time.monotonic() - started < 0.1 + 0.4  # the timeout, plus slack
        finally:
            redis.resume()
        assert (await store.hit(fresh, policy)).remaining == 9  # its own bucket's answer
    finally:
        await store.close()
