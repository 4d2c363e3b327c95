"""The auth stage: admit the caller by the route's policy before the body is read, then tell
the upstream who it is (X-Consumer, X-Auth-Subject, X-Auth-Scopes) through the Exchange."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.auth.identity import RequestFacts
from gateway.auth.policy import RoutePolicy
from gateway.http.exchange import EXCHANGE

if TYPE_CHECKING:
    from gateway.http.pipeline import Handler, Stage


def auth_stage(policy: RoutePolicy | None) -> Stage | None:
    if policy is None:
        return None
    strip = policy.strip

    def wrap(next_handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            exchange = request[EXCHANGE]
            identity = await policy.admit(
                RequestFacts(request.method, exchange.path, request.headers)
            )
            exchange.consumer = identity.consumer
            exchange.upstream_set += policy.upstream_headers(identity)
            if strip:
                exchange.upstream_remove |= strip
            return await next_handler(request)

        return handle

    return wrap
