"""The shared store: every worker and replica takes from one bucket per key in Redis.

One check is one EVALSHA of the script below (redis-py's registered script: EVAL once if the
server does not know it yet), so it is atomic; checks made in the same event-loop iteration
share one pipeline, so a batch is one round trip. The script reads the Redis
server's TIME, so gateways with skewed clocks still agree, and stores each bucket with PX at
the moment it is full again: an idle key expires on its own. The client is made on the event
loop at the first check, with socket timeouts at `store.timeout` and no retries (the guard in
store.py owns the time budget), and closed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

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


def _expire(batch: list[tuple[str, RateLimitPolicy, asyncio.Future[Decision]]]) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(TimeoutError())


class RedisStore:
    """Checks issued in the same event-loop iteration go to Redis together: one pipeline (no
    MULTI), one EVALSHA per check, so each check is still one atomic script, and the batch
    costs one round trip and one write instead of one per check."""

    bounded: Final = True  # every check is answered within store.timeout, by its batch's timer

    def __init__(self, config: RateLimitStoreConfig) -> None:
        assert config.redis is not None
        self._url = config.redis
        self._timeout = config.timeout
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._pending: list[tuple[str, RateLimitPolicy, asyncio.Future[Decision]]] = []
        self._flushes: set[asyncio.Task[None]] = set()  # referenced until done

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((key, policy, future))
        if len(self._pending) == 1:  # the first of this iteration: its flush runs after it
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await future

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        # One timer per batch bounds each of its checks (so the guard needs none per check).
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, batch)
        try:
            await self._answer(batch)
        finally:
            timer.cancel()

    async def _answer(
        self, batch: list[tuple[str, RateLimitPolicy, asyncio.Future[Decision]]]
    ) -> None:
        try:
            if len(batch) == 1:  # nothing to batch: redis-py's script call, EVAL on NOSCRIPT
                key, policy, future = batch[0]
                replies: list[Any] = [await self._one(key, policy)]
            else:
                replies = await self._many(batch)
                unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if unknown:  # a fresh or restarted Redis: load the script once, ask those again
                    assert self._client is not None
                    await self._client.script_load(TAKE_SCRIPT)
                    again = await self._many([batch[i] for i in unknown])
                    for i, reply in zip(unknown, again, strict=True):
                        replies[i] = reply
        except Exception as exc:  # the whole batch failed: each waiting check hears it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, policy, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its guard gave up waiting
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                admitted, ahead = reply
                future.set_result(decided(admitted == 1, int(ahead), policy))

    async def _one(self, key: str, policy: RateLimitPolicy) -> Any:
        script = self._script or self._connect()
        return await script(keys=[KEY_PREFIX + key], args=[policy.interval_us, policy.capacity_us])

    async def _many(self, batch: list[tuple[str, RateLimitPolicy, Any]]) -> list[Any]:
        """One write of every EVALSHA, then their replies in order, on one pooled connection
        (redis-py's Pipeline would do the same with more Python per command). An error reply
        (NOSCRIPT) is that check's answer; a failed connection is the whole batch's."""
        script = self._script or self._connect()
        assert self._client is not None
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            commands = [
                ("EVALSHA", script.sha, 1, KEY_PREFIX + key, policy.interval_us, policy.capacity_us)
                for key, policy, _ in batch
            ]
            await connection.send_packed_command(
                connection.pack_commands(commands), check_health=False
            )
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:  # read whole: the next reply follows
                    replies.append(error)
        except BaseException:
            await connection.disconnect(nowait=True)  # replies may be left unread on it
            raise
        finally:
            await pool.release(connection)
        return replies

    def _connect(self) -> AsyncScript:
        self._client = client(self._url, self._timeout)
        self._script = self._client.register_script(TAKE_SCRIPT)
        return self._script

    async def close(self) -> None:
        for task in list(self._flushes):  # their checks' guards answer them
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
