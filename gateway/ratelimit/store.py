"""The store protocol, the guard every shared store runs behind, and the process's holder.

The guard bounds a check by `store.timeout` (asyncio.timeout; a store that says it is
`bounded` keeps to it itself, as RedisStore does with one timer per batch of checks, and is
awaited with no timer of the guard's), and when the store is slow or down it decides by
`on_store_error`: admit without checking (allow, the default) or refuse with 503 (deny).
Each failed check is counted; the change from answering to failing is logged once, and the
first answer after that once. Recovery needs nothing: every check asks the store again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.config.model import RateLimitPolicy, RateLimitStoreConfig
from gateway.http.errors import RateLimitUnavailable
from gateway.ratelimit.bucket import UNCHECKED, Decision, decided
from gateway.ratelimit.memory import MemoryStore

logger = logging.getLogger("gateway.ratelimit")


class RateLimitStore(Protocol):
    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        """Take one token from bucket `key` and say whether the request may go on."""
        ...

    async def close(self) -> None: ...


class SharedStore(RateLimitStore, Protocol):
    def check(self, key: str, policy: RateLimitPolicy) -> Awaitable[int]:
        """`hit`'s take as its signed integer (bucket.py), which the guard awaits."""
        ...


class GuardedStore:
    """A store that may fail, made to answer within `timeout` whatever it does."""

    def __init__(
        self, store: SharedStore, config: RateLimitStoreConfig, on_error: Callable[[], None]
    ) -> None:
        self.store = store
        self._timeout = config.timeout
        self._bounded = getattr(store, "bounded", False)  # RedisStore: one timer per batch
        self._deny = config.on_store_error == "deny"
        self._on_error = on_error
        self.failing = False

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        answer = await self.answer(key, policy)
        return UNCHECKED if answer is None else decided(answer, policy)

    async def answer(self, key: str, policy: RateLimitPolicy) -> int | None:
        """The take's signed integer (bucket.py), or None when the store failed and the
        request goes on unchecked (what the stage calls: no Decision made per request)."""
        try:
            if self._bounded:  # the store keeps to the timeout itself, more cheaply
                answer = await self.store.check(key, policy)
            else:
                async with asyncio.timeout(self._timeout):
                    answer = await self.store.check(key, policy)
        except Exception as exc:  # any failure of the store is an outage
            self._failed(exc)
            return None
        if self.failing:
            self.failing = False
            logger.info("rate-limit store answers again; limits are enforced")
        return answer

    def _failed(self, exc: Exception) -> None:
        self._on_error()
        if not self.failing:
            self.failing = True
            what = "did not answer in time" if isinstance(exc, TimeoutError) else "failed"
            verdict = "refused with 503" if self._deny else "admitted unchecked"
            logger.warning(
                "rate-limit store %s (%s); requests on limited routes are %s until it answers",
                what, type(exc).__name__, verdict,
            )  # fmt: skip
        if self._deny:
            raise RateLimitUnavailable("the rate-limit store is unavailable; try again shortly")

    async def close(self) -> None:
        await self.store.close()


class RateLimits:
    """The process's stores: the memory store, and the Redis one while the config names it.
    A reload with the same store config keeps the same store, so buckets survive reloads."""

    def __init__(self, on_error: Callable[[], None] = lambda: None) -> None:
        self.memory = MemoryStore()
        self._on_error = on_error
        self._config: RateLimitStoreConfig | None = None
        self._shared: GuardedStore | None = None
        self._retired: list[RateLimitStore] = []

    def store_for(self, config: RateLimitStoreConfig) -> MemoryStore | GuardedStore:
        if config.redis is None:
            return self.memory
        if self._shared is None or config != self._config:
            from gateway.ratelimit.redisstore import RedisStore  # redis-py only when named

            if self._shared is not None:
                self._retired.append(self._shared)
            self._shared = GuardedStore(RedisStore(config), config, self._on_error)
            self._config = config
        return self._shared

    async def close(self) -> None:
        stores = [*self._retired, *([self._shared] if self._shared else [])]
        self._retired, self._shared, self._config = [], None, None
        for store in stores:
            await store.close()
