"""Rate limits: one token from the route's bucket for the request's key before the body is
read; the RateLimit-* headers on every answer of the route, 429 with Retry-After when empty.

The logic is in gateway/ratelimit/; this adapter only wires it into the chain."""

from __future__ import annotations

from aiohttp import web

from gateway.config.model import RateLimitPolicy, RouteConfig
from gateway.http.errors import RateLimited
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Answer
from gateway.ratelimit.bucket import decided
from gateway.ratelimit.keys import RETRY_AFTER, HeaderMaker, key_of, retry_after
from gateway.ratelimit.memory import MemoryStore
from gateway.ratelimit.store import GuardedStore


class RateLimitStage:
    """Request phase only: one token for the request's key, or 429."""

    __slots__ = (
        "detail", "full", "full_answer", "ip", "key", "maker", "policy", "shared", "take"
    )  # fmt: skip

    def __init__(
        self, route: RouteConfig, policy: RateLimitPolicy, store: MemoryStore | GuardedStore
    ) -> None:
        self.policy = policy
        # The memory store's take is a plain call for this policy's table, answering an int;
        # the shared store's guard answers the same int (None: unchecked). No Decision made.
        self.take = store.taker(policy) if isinstance(store, MemoryStore) else None
        self.shared = store if isinstance(store, GuardedStore) else None
        # per route: by prefix, stable across reloads
        bucket = f"rl:{route.prefix}|"
        self.key = key_of(bucket, policy.key)
        self.ip = bucket + "ip:" if policy.key == "ip" else None  # key_of's, made in place
        self.maker = maker = HeaderMaker(policy)
        self.full, self.full_answer = maker.full, maker.full_answer
        self.detail = (
            f"this route admits {policy.limit} requests per {policy.per:g}s; try again later"
        )

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        ip = self.ip
        key = ip + exchange.client if ip is not None else self.key(exchange, request.headers)
        take = self.take
        if take is not None:
            answer = take(key)
        else:
            assert self.shared is not None
            checked = await self.shared.answer(key, self.policy)
            if checked is None:  # the store did not answer: nothing to report
                return None
            answer = checked
        if answer == self.full_answer:  # a full bucket's take: its headers are made already
            exchange.response_headers += self.full
            return None
        if answer > 0:
            exchange.response_headers += self.maker.admitted(answer)
            return None
        decision = decided(answer, self.policy)  # refused
        exchange.response_headers += self.maker.headers(decision)
        raise RateLimited(self.detail, headers={RETRY_AFTER: retry_after(decision)})


def rate_limit_stage(
    route: RouteConfig, store: MemoryStore | GuardedStore
) -> RateLimitStage | None:
    policy = route.rate_limit
    return None if policy is None else RateLimitStage(route, policy, store)
