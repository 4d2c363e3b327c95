"""The process's response cache: one store (its file shared by the workers), one coalescer and
one invalidator, made when the first config with a cached route is loaded and kept across
reloads (a changed `store.cache_*` needs a restart, like the listeners)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.cache.coalesce import Coalescer
from gateway.cache.invalidate import Invalidator
from gateway.cache.store import CacheStore
from gateway.config.model import CacheStoreConfig

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger("gateway.cache")


class ResponseCache:
    def __init__(
        self, config: CacheStoreConfig, redis: Callable[[], aioredis.Redis] | None = None
    ) -> None:
        self.config = config
        self.store = CacheStore(config)
        self.coalescer = Coalescer()
        self.invalidator = Invalidator(self.store, redis)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a --check): nothing to listen with
        self.invalidator.start()

    def check(self, config: CacheStoreConfig) -> None:
        if config != self.config:
            logger.warning("store.cache_* changed: it applies after a restart (the file is open)")

    async def close(self) -> None:
        await self.invalidator.close()
        await self.store.close()
