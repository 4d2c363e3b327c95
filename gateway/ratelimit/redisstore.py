"""The shared store: every worker and replica takes from one bucket per key in Redis.

Every check is made by the one Lua script below, on the Redis server's clock (TIME), and
stores its bucket with PX at the moment it is full again, so an idle key expires on its own.
Checks are batched: those made while a round trip is under way (or in the same event-loop
iteration, for the first) go together as one EVALSHA of the script over all their keys,
which takes each bucket in turn. A script runs atomically, so each check is atomic (and sees
every check before it, in its batch or not), and a check costs one round trip, shared with
its batch: one write, one reply, one script call for the lot. One batch is in flight at a
time, on one connection held for the store's life (redis-py's, with its hiredis parser;
redis-py reconnects it after a failure).

Time: each batch has one timer, started when its first check joins, at `store.timeout`. When
it fires, the batch's checks fail with TimeoutError (the guard in store.py decides them by
on_store_error), and a round trip still under way is cancelled, which drops its connection.
So the connection has no timer per read or write of its own; connecting is bounded by
`socket_connect_timeout` too. The client is made on the event loop at the first check, with
no retries, and closed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

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

# KEYS: the buckets of a batch. ARGV: runs of keys that share a policy, in KEYS order, three
# numbers each: how many keys, microseconds per token, burst * that. Returns one signed
# integer per key: bucket.py's step() in Lua (> 0 admitted: microseconds from now to the TAT;
# <= 0 refused: minus that). '%.0f' writes the TAT whole (tostring would round it to 14
# digits). A key twice in one batch is taken twice, the second seeing the first.
TAKE_SCRIPT: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local answers, k = {}, 1
for run = 1, #ARGV, 3 do
  local interval = tonumber(ARGV[run + 1])
  local capacity = tonumber(ARGV[run + 2])
  for _ = 1, tonumber(ARGV[run]) do
    local tat = tonumber(redis.call('GET', KEYS[k]))
    if tat == nil or tat < now then tat = now end
    local ahead = tat + interval - now
    if ahead > capacity then
      answers[k] = now - tat
    else
      redis.call('SET', KEYS[k], string.format('%.0f', tat + interval),
                 'PX', math.ceil(ahead / 1000))
      answers[k] = ahead
    end
    k = k + 1
  end
end
return answers
"""
TAKE_SHA: Final = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()  # what EVALSHA names


class _Batch:
    """Checks that go to Redis together: their keys, the script's ARGV, a future each."""

    __slots__ = ("args", "futures", "keys", "loop", "policy", "run", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.keys: list[str] = []
        self.args: list[int] = []
        self.futures: list[asyncio.Future[int]] = []
        self.policy: RateLimitPolicy | None = None  # the policy of the last run in `args`
        self.run = 0  # where in `args` that run's count is
        self.timer: asyncio.TimerHandle | None = None

    def fail(self, error: Exception) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(error)


class RedisStore:
    """The shared store; see the module's docstring for how checks are batched and timed."""

    bounded: Final = True  # every check is answered within store.timeout, by its batch's timer

    def __init__(self, config: RateLimitStoreConfig) -> None:
        assert config.redis is not None
        self._url = config.redis
        self._timeout = config.timeout
        self._client: aioredis.Redis | None = None
        self._connection: AbstractConnection | None = None
        self._open: _Batch | None = None  # checks joining, not sent yet
        self._sending: _Batch | None = None  # the batch in flight
        self._sender: asyncio.Task[None] | None = None  # sends batches while there are any
        self._abandoned: _Batch | None = None  # in flight, its time up: the sender cancelled
        self._closed = False

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        return decided(await self.check(key, policy), policy)

    def check(self, key: str, policy: RateLimitPolicy) -> asyncio.Future[int]:
        """One check joins the open batch: its future answers the take's signed integer
        (bucket.py), or fails with the batch. A plain call: the guard awaits the future."""
        batch = self._open or self._begin()
        future: asyncio.Future[int] = batch.loop.create_future()
        batch.futures.append(future)
        batch.keys.append(KEY_PREFIX + key)
        if policy is batch.policy:
            batch.args[batch.run] += 1
        else:  # a new run: checks of one route come in runs, so ARGV stays short
            batch.policy, batch.run = policy, len(batch.args)
            batch.args += (1, policy.interval_us, policy.capacity_us)
        return future

    def _begin(self) -> _Batch:
        """A new open batch, its timer started; the sender started if it is not running (its
        first step comes after this iteration's other checks have joined)."""
        loop = asyncio.get_running_loop()
        batch = self._open = _Batch(loop)
        batch.timer = loop.call_later(self._timeout, self._expire, batch)
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return batch

    def _expire(self, batch: _Batch) -> None:
        """The batch's time is up: its checks fail, and if it is in flight its round trip is
        cancelled (that drops the connection: the reply may never come)."""
        batch.fail(TimeoutError())
        if batch is self._open:
            self._open = None
        elif batch is self._sending and self._sender is not None:
            self._abandoned = batch
            self._sender.cancel()

    async def _send(self) -> None:
        try:
            while (batch := self._open) is not None:
                self._open, self._sending = None, batch
                try:
                    if self._closed:
                        raise ConnectionError("the rate-limit store is closed")
                    answers = await self._round_trip(batch)
                except asyncio.CancelledError:
                    if self._abandoned is not batch or self._closed:
                        raise  # a shutdown
                    self._abandoned = None
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()  # only the batch's timer: go on with the next one
                except Exception as exc:  # the round trip failed: each check hears it
                    batch.fail(exc)
                else:
                    for future, answer in zip(batch.futures, answers, strict=True):
                        if not future.done():  # else its timer answered it, or it was cancelled
                            future.set_result(answer)
                finally:
                    self._sending = None
                    if batch.timer is not None:
                        batch.timer.cancel()
        finally:
            self._sender = None

    async def _round_trip(self, batch: _Batch) -> list[int]:
        """One EVALSHA of the whole batch and its reply. A Redis that does not know the script
        (fresh, restarted, flushed) is sent EVAL of it instead, which caches it there again. A
        failed write or read, or a cancelled one, makes redis-py drop the connection."""
        connection = self._connection or await self._connect()
        count = len(batch.keys)
        try:
            await connection.send_packed_command(
                connection.pack_command("EVALSHA", TAKE_SHA, count, *batch.keys, *batch.args),
                check_health=False,
            )
            answers: list[int] = await connection.read_response()
        except NoScriptError:  # its reply was read whole: the connection is fine
            await connection.send_packed_command(
                connection.pack_command("EVAL", TAKE_SCRIPT, count, *batch.keys, *batch.args),
                check_health=False,
            )
            answers = await connection.read_response()
        return answers

    async def _connect(self) -> AbstractConnection:
        if self._client is None:
            self._client = client(self._url, self._timeout, io_timeouts=False)
        pool = self._client.connection_pool
        connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        self._connection = connection  # held, never released to the pool until close
        return connection

    async def close(self) -> None:
        self._closed = True
        sender = self._sender
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        for batch in (self._open, self._sending):
            if batch is not None:
                batch.fail(ConnectionError("the rate-limit store is closed"))
        client, self._client = self._client, None
        connection, self._connection = self._connection, None
        if client is not None:
            if connection is not None:
                await client.connection_pool.release(connection)
            await client.aclose()


def client(url: str, timeout: float, *, io_timeouts: bool = True) -> aioredis.Redis:
    """A redis-py asyncio client for store.redis: redis://, rediss://, unix:// as redis-py
    reads them (query options included), or redis+sentinel:// (see gateway/redisurl.py).
    `timeout` bounds connecting and, unless `io_timeouts` is False (a caller that bounds each
    round trip itself), each read and write; queries to Sentinels are bounded either way."""
    # No CLIENT SETINFO: it costs a round trip per new connection, and finding redis-py's own
    # version reads package metadata from disk, on the event loop.
    bounded: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        **_NO_SETINFO,
    }
    options = bounded if io_timeouts else {**bounded, "socket_timeout": None}
    if url.split("://", 1)[0] not in SENTINEL_SCHEMES:
        return aioredis.Redis.from_url(url, **options)
    where = parse_sentinel(url)
    auth = {"username": where.username, "password": where.password, "ssl": where.tls}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # not annotated upstream
        list(where.sentinels), sentinel_kwargs={**bounded, **auth}, **options
    )
    master: aioredis.Redis = sentinel.master_for(where.master, db=where.db, **auth)  # type: ignore[arg-type]
    return master
