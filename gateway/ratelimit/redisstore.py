"""The shared store: every worker and replica takes from one bucket per key in Redis.

One check is one EVALSHA of the script below (redis-py's registered script: EVAL once if the
server does not know it yet), so it is atomic and one round trip. The script reads the Redis
server's TIME, so gateways with skewed clocks still agree, and stores each bucket with PX at
the moment it is full again: an idle key expires on its own. The client is made on the event
loop at the first check, with socket timeouts at `store.timeout` and no retries (the guard in
store.py owns the time budget), and closed at shutdown.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from gateway.config.model import RateLimitPolicy, RateLimitStoreConfig
from gateway.config.redisurl import SENTINEL_SCHEMES, parse_sentinel
from gateway.ratelimit.bucket import Decision, decided

KEY_PREFIX: Final = "gateway:"
# redis-py 7.2 replaced lib_name/lib_version (now deprecated) with driver_info.
_NO_SETINFO: Final[dict[str, None]] = (
    {"driver_info": None}
    if importlib.util.find_spec("redis.driver_info")
    else {"lib_name": None, "lib_version": None}
)

# KEYS[1] the bucket; ARGV[1] microseconds per token; ARGV[2] burst * ARGV[1].
# Returns {1 admitted | 0 refused, microseconds from now to the bucket's TAT}. bucket.py's
# take() in Lua; '%.0f' writes the TAT whole (tostring would round it to 14 digits).
TAKE_SCRIPT: Final = """
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local ahead = tat + interval - now
if ahead > capacity then return {0, tat - now} end
redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX', math.ceil(ahead / 1000))
return {1, ahead}
"""


class RedisStore:
    def __init__(self, config: RateLimitStoreConfig) -> None:
        assert config.redis is not None
        self._url = config.redis
        self._timeout = config.timeout
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        script = self._script or self._connect()
        admitted, ahead = await script(
            keys=[KEY_PREFIX + key], args=[policy.interval_us, policy.capacity_us]
        )
        return decided(admitted == 1, int(ahead), policy)

    def _connect(self) -> AsyncScript:
        self._client = client(self._url, self._timeout)
        self._script = self._client.register_script(TAKE_SCRIPT)
        return self._script

    async def close(self) -> None:
        client, self._client, self._script = self._client, None, None
        if client is not None:
            await client.aclose()


def client(url: str, timeout: float) -> aioredis.Redis:
    """A redis-py asyncio client for store.redis: redis://, rediss://, unix:// as redis-py
    reads them (query options included), or redis+sentinel:// (see gateway/redisurl.py)."""
    # No CLIENT SETINFO: it costs a round trip per new connection, and finding redis-py's own
    # version reads package metadata from disk, on the event loop.
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        **_NO_SETINFO,
    }
    if url.split("://", 1)[0] not in SENTINEL_SCHEMES:
        return aioredis.Redis.from_url(url, **options)
    where = parse_sentinel(url)
    auth = {"username": where.username, "password": where.password, "ssl": where.tls}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # not annotated upstream
        list(where.sentinels), sentinel_kwargs={**options, **auth}, **options
    )
    master: aioredis.Redis = sentinel.master_for(where.master, db=where.db, **auth)  # type: ignore[arg-type]
    return master
