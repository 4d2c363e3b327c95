"""The response cache across real processes (CONTRACT §10): `--workers 2` share one cache file,
so an entry one worker stored is a hit on the other, and a write through either drops it for
both, even where each had the entry in memory; two gateways sharing `store.redis` (each its
own file) drop each other's entries on a write."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.cache.invalidate import CHANNEL
from tests.cache_upstream import CountingUpstream
from tests.polling import eventually
from tests.processes.procs import GatewayProcess
from tests.redis_server import RedisServer

ROUNDS = 40  # requests on fresh connections: P(all on one of two workers) = 2**-39
ROUTES = """version: 1
store: {{cache_dir: "{dir}"{redis}}}
services:
  up: {{targets: [{up}]}}
routes:
  - prefix: /c
    service: up
    cache: {{ttl: 60s}}
"""


@pytest.fixture
def upstream() -> CountingUpstream:
    return CountingUpstream()


@pytest.fixture
async def up_server(aiohttp_server: AiohttpServer, upstream: CountingUpstream) -> TestServer:
    return await aiohttp_server(upstream.app())


def write_routes(tmp_path: Path, name: str, up: TestServer, redis: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    base = str(up.make_url("")).rstrip("/")
    extra = f', redis: "{redis}"' if redis else ""
    path.write_text(ROUTES.format(dir=tmp_path / f"cache-{name}", up=base, redis=extra))
    return path


async def fetch_each_on_a_new_connection(url: str, count: int) -> list[tuple[int, str]]:
    """`count` GETs one after another, each on its own connection (the kernel spreads new
    connections over the workers): (the upstream's request number, X-Cache) of each."""
    out = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            async with session.get(url) as resp:
                assert resp.status == 200
                out.append((json.loads(await resp.text())["n"], resp.headers["X-Cache"]))
    return out


async def test_two_workers_share_entries_and_a_write_makes_the_next_get_a_miss_on_both(
    tmp_path: Path, up_server: TestServer, upstream: CountingUpstream
) -> None:
    gateway = await GatewayProcess.start(write_routes(tmp_path, "w", up_server), workers=2)
    try:
        url = f"{gateway.url}/c/devices/7"
        before = await fetch_each_on_a_new_connection(url, ROUNDS)
        assert before == [(1, "MISS")] + [(1, "HIT")] * (ROUNDS - 1)  # both workers hit
        assert upstream.count("/c/devices/7") == 1

        async with aiohttp.ClientSession() as session, session.patch(url, json={}) as resp:
            assert resp.status == 200

        after = await fetch_each_on_a_new_connection(url, ROUNDS)
        assert after == [(2, "MISS")] + [(2, "HIT")] * (ROUNDS - 1)  # no worker kept the old
        assert upstream.count("/c/devices/7") == 2
    finally:
        await gateway.stop()


async def test_concurrent_misses_across_two_workers_reach_the_upstream_at_most_twice(
    tmp_path: Path, up_server: TestServer, upstream: CountingUpstream
) -> None:
    gateway = await GatewayProcess.start(write_routes(tmp_path, "c", up_server), workers=2)
    try:
        url = f"{gateway.url}/c/slow?delay=0.3"
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                async with session.get(url) as resp:
                    return resp.status

            assert await asyncio.gather(*(one() for _ in range(50))) == [200] * 50
        assert upstream.count("/c/slow?delay=0.3") <= 2  # one leader per worker
    finally:
        await gateway.stop()


async def both_subscribed(url: str) -> None:
    """Poll Redis until two subscribers (the two replicas) listen on the invalidation channel:
    each subscribes once it has started, and a message is only delivered to listeners."""
    client = aioredis.from_url(url)
    try:

        async def two() -> bool:
            counts = await client.pubsub_numsub(CHANNEL)
            return bool(counts) and int(counts[0][1]) >= 2

        await eventually(two, within=5.0)
    finally:
        await client.aclose()


async def test_replicas_sharing_redis_drop_each_others_entries_on_a_write(
    tmp_path: Path, up_server: TestServer, upstream: CountingUpstream, redis: RedisServer
) -> None:
    first = await GatewayProcess.start(write_routes(tmp_path, "a", up_server, redis.url))
    second = await GatewayProcess.start(write_routes(tmp_path, "b", up_server, redis.url))
    try:
        path = f"/c/{redis.namespace}"
        for gateway in (first, second):
            seen = await fetch_each_on_a_new_connection(gateway.url + path, 2)
            assert [cache for _, cache in seen] == ["MISS", "HIT"]  # each its own file
        await both_subscribed(redis.url)  # a drop published before that would reach one replica
        async with aiohttp.ClientSession() as session, session.delete(first.url + path) as resp:
            assert resp.status == 200

        async def dropped_on_the_other_replica() -> bool:
            return (await fetch_each_on_a_new_connection(second.url + path, 1))[0][1] == "MISS"

        await eventually(dropped_on_the_other_replica, within=5.0)
    finally:
        await first.stop()
        await second.stop()
