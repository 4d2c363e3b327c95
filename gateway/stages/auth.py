"""The auth stage: admit the caller by the route's policy before the body is read, then tell
the upstream who it is (X-Consumer, X-Auth-Subject, X-Auth-Scopes) through the Exchange."""

from __future__ import annotations

from aiohttp import web

from gateway.auth.identity import RequestFacts, upstream_headers
from gateway.auth.policy import RoutePolicy
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Answer


class AuthStage:
    """Request phase only: admit or refuse (401, 403) before any body byte is read."""

    __slots__ = ("admit_now", "policy", "strip")

    def __init__(self, policy: RoutePolicy) -> None:
        self.policy = policy
        self.strip = policy.strip
        # A policy whose methods never wait (API keys) admits with a plain call.
        self.admit_now = policy.admit_now if policy.synchronous else None

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        facts = RequestFacts(request.method, exchange.path, request.headers)
        admit_now = self.admit_now
        if admit_now is not None:  # no sub-requests to record
            identity = admit_now(facts)
        else:
            try:
                identity = await self.policy.admit(facts)
            finally:
                if facts.calls:  # forward auth's sub-requests, for the access line and metrics
                    exchange.calls += tuple(facts.calls)
        exchange.consumer = identity.consumer
        exchange.upstream_set += identity.sent_up or upstream_headers(identity)
        if self.strip:
            exchange.upstream_remove |= self.strip
        return None


def auth_stage(policy: RoutePolicy | None) -> AuthStage | None:
    return None if policy is None else AuthStage(policy)
