"""The request_headers / response_headers transforms of a route.

Request rules go to the Exchange for the forwarder to apply; response rules are applied by the
on_response_prepare hook, since a streamed response is on the wire before a handler returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config.model import HeaderRules
from gateway.http.exchange import EXCHANGE

if TYPE_CHECKING:
    from gateway.http.pipeline import Handler, Stage


def headers_stage(request_rules: HeaderRules, response_rules: HeaderRules) -> Stage | None:
    if not request_rules and not response_rules:
        return None
    # A set rule replaces: the client's header of that name is dropped too.
    remove = frozenset({name.lower() for name in request_rules.remove}) | {
        name.lower() for name, _ in request_rules.set
    }
    upstream_set = tuple(request_rules.set)
    response = response_rules or None

    def wrap(next_handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            exchange = request[EXCHANGE]
            if remove:
                exchange.upstream_remove |= remove
            exchange.upstream_set += upstream_set
            exchange.response_rules = response
            return await next_handler(request)

        return handle

    return wrap
