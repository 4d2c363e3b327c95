"""Rate limits: one token from the route's bucket for the request's key before the body is
read; the RateLimit-* headers on every answer of the route, 429 with Retry-After when empty.

The logic is in gateway/ratelimit/; this adapter only wires it into the chain."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config.model import RouteConfig
from gateway.http.errors import RateLimited
from gateway.http.exchange import EXCHANGE
from gateway.ratelimit.keys import RETRY_AFTER, HeaderMaker, retry_after, subject_of
from gateway.ratelimit.store import RateLimitStore

if TYPE_CHECKING:
    from gateway.http.pipeline import Handler, Stage


def rate_limit_stage(route: RouteConfig, store: RateLimitStore) -> Stage | None:
    policy = route.rate_limit
    if policy is None:
        return None
    subject = subject_of(policy.key)
    bucket = f"rl:{route.prefix}|"  # buckets are per route: by prefix, stable across reloads
    maker = HeaderMaker(policy)
    detail = f"this route admits {policy.limit} requests per {policy.per:g}s; try again later"

    def wrap(next_handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            exchange = request[EXCHANGE]
            decision = await store.hit(bucket + subject(exchange, request.headers), policy)
            if decision.checked:
                exchange.response_headers += maker.headers(decision)
            if not decision.allowed:
                raise RateLimited(detail, headers={RETRY_AFTER: retry_after(decision)})
            return await next_handler(request)

        return handle

    return wrap
