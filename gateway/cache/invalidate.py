"""Dropping entries: after a successful write through the gateway, and on an admin purge.

Workers of one process group share the SQLite file, so a drop there (with its generation bump,
see store.py) is seen by every worker at its next lookup. Replicas each have their own file;
with `store.redis` set, each drop is also published on the Redis channel `CHANNEL` and every
replica's workers apply it to their file. Pub/sub rather than entries in Redis: a hit stays
a local read (no network round trip on the path that must be fast), and an invalidation is
a small, rare event. What pub/sub cannot give, a replica that was disconnected when the message
went out, is bounded by `ttl`: its entries expire on their own (the subscriber logs the gap and
reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gateway.cache.store import CacheStore

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger("gateway.cache")

CHANNEL: Final = "gateway:cache:invalidate"
PUBLISH_TIMEOUT_SECONDS: Final = 1.0
RECONNECT_SECONDS: Final = 1.0


class Invalidator:
    """Drops entries here, and (with Redis) tells the other replicas to."""

    def __init__(
        self, store: CacheStore, redis: Callable[[], aioredis.Redis] | None = None
    ) -> None:
        self.store = store
        self._redis = redis
        self._client: aioredis.Redis | None = None
        self._origin = uuid.uuid4().hex  # this process: its own messages are not applied twice
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set while the subscriber listens (tests wait on it)

    async def paths(self, paths: list[str]) -> None:
        await self.store.drop_paths(paths)
        await self._publish({"paths": paths})

    async def purge(self, prefix: str) -> int:
        dropped = await self.store.purge(prefix)
        await self._publish({"prefix": prefix})
        return dropped

    async def _publish(self, message: dict[str, Any]) -> None:
        if self._redis is None:
            return
        if self._client is None:
            self._client = self._redis()
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await self._client.publish(CHANNEL, json.dumps({**message, "origin": self._origin}))
        except Exception as exc:  # Redis down: replicas keep entries until their ttl
            logger.warning("cache invalidation not published to replicas (%s)", type(exc).__name__)

    def start(self) -> None:
        """Listen for other replicas' drops (with Redis; call with a running loop)."""
        if self._redis is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name="cache invalidations"
            )

    async def _listen(self) -> None:
        assert self._redis is not None
        while True:
            client = self._redis()
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(CHANNEL)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        await self._apply(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                logger.warning(
                    "cache invalidations from replicas not received (%s); reconnecting",
                    type(exc).__name__,
                )
                await asyncio.sleep(RECONNECT_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _apply(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, bytes | str) else None
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("origin") == self._origin:
            return
        paths, prefix = message.get("paths"), message.get("prefix")
        if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
            await self.store.drop_paths(paths)
        elif isinstance(prefix, str):
            await self.store.purge(prefix)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
