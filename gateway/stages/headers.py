"""The request_headers / response_headers transforms of a route.

Request rules go to the Exchange for the forwarder to apply; response rules are applied by the
on_response_prepare hook, so that they reach the gateway's own answers (problem+json) as well
as relayed ones.
"""

from __future__ import annotations

from aiohttp import web

from gateway.config.model import HeaderRules
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Answer


class HeadersStage:
    __slots__ = ("remove", "response", "upstream_set")

    def __init__(self, request_rules: HeaderRules, response_rules: HeaderRules) -> None:
        # A set rule replaces: the client's header of that name is dropped too.
        self.remove = frozenset({name.lower() for name in request_rules.remove}) | {
            name.lower() for name, _ in request_rules.set
        }
        self.upstream_set = tuple(request_rules.set)
        self.response = response_rules or None

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        self.without_body(exchange)
        return None

    def without_body(self, exchange: Exchange) -> None:
        """The request phase, whatever the request (the hit lane calls it for a body-less one):
        the rules on the Exchange."""
        if self.remove:
            exchange.upstream_remove |= self.remove
        exchange.upstream_set += self.upstream_set
        exchange.response_rules = self.response


def headers_stage(request_rules: HeaderRules, response_rules: HeaderRules) -> HeadersStage | None:
    if not request_rules and not response_rules:
        return None
    return HeadersStage(request_rules, response_rules)
