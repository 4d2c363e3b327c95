"""Rate limits: one token from the route's bucket for the request's key before the body is
read; the RateLimit-* headers on every answer of the route, 429 with Retry-After when empty.

The logic is in gateway/ratelimit/; this adapter only wires it into the chain."""

from __future__ import annotations

from aiohttp import web

from gateway.config.model import RateLimitPolicy, RouteConfig
from gateway.http.errors import RateLimited
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Answer
from gateway.ratelimit.keys import RETRY_AFTER, HeaderMaker, retry_after, subject_of
from gateway.ratelimit.memory import MemoryStore
from gateway.ratelimit.store import RateLimitStore


class RateLimitStage:
    """Request phase only: one token for the request's key, or 429."""

    __slots__ = ("bucket", "detail", "maker", "policy", "store", "subject", "take")

    def __init__(self, route: RouteConfig, policy: RateLimitPolicy, store: RateLimitStore) -> None:
        self.policy, self.store = policy, store
        # The memory store's take is synchronous: called directly, no coroutine per request.
        self.take = store.take if isinstance(store, MemoryStore) else None
        self.subject = subject_of(policy.key)
        self.bucket = f"rl:{route.prefix}|"  # per route: by prefix, stable across reloads
        self.maker = HeaderMaker(policy)
        self.detail = (
            f"this route admits {policy.limit} requests per {policy.per:g}s; try again later"
        )

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        key = self.bucket + self.subject(exchange, request.headers)
        take = self.take
        if take is not None:
            decision = take(key, self.policy)
        else:
            decision = await self.store.hit(key, self.policy)
        if decision.checked:
            exchange.response_headers += self.maker.headers(decision)
        if not decision.allowed:
            raise RateLimited(self.detail, headers={RETRY_AFTER: retry_after(decision)})
        return None


def rate_limit_stage(route: RouteConfig, store: RateLimitStore) -> RateLimitStage | None:
    policy = route.rate_limit
    return None if policy is None else RateLimitStage(route, policy, store)
