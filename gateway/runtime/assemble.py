"""The model to a RouteTable: each route's chain is built here, once per load.

`build_chain` is the only place the order of stages is written. A stage factory returns None
when its route does not configure the feature, so an unconfigured feature costs nothing per
request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from gateway.actions.forward import forward_handler
from gateway.config.model import GatewayConfig, RouteConfig
from gateway.http.pipeline import Handler, Stage
from gateway.http.proxies import ClientAddress
from gateway.http.routing import Route, RouteTable
from gateway.ratelimit.memory import MemoryStore
from gateway.ratelimit.store import RateLimitStore
from gateway.stages.bodylimit import body_limit_stage
from gateway.stages.headers import headers_stage
from gateway.stages.ratelimit import rate_limit_stage
from gateway.upstream.service import Service


def build_table(
    config: GatewayConfig,
    services: Mapping[str, Service],
    rate_limits: RateLimitStore | None = None,
) -> RouteTable:
    """Compose every route's chain once; requests only look the result up. `rate_limits` is
    the process's store (kept across reloads); None: a fresh one in memory."""
    rate_limits = MemoryStore() if rate_limits is None else rate_limits
    routes = []
    for route in config.routes:
        forward = forward_handler(route, services[route.service], config.max_message_bytes)
        chain = build_chain(route, forward, config.max_body_bytes, rate_limits)
        limit = body_limit_of(route, config.max_body_bytes)
        routes.append(Route(route, chain.handler, chain.stages, limit))
    return RouteTable(routes, ClientAddress(config.trusted_proxies))


def compose(stages: Sequence[Stage | None], innermost: Handler) -> Handler:
    """Wrap `innermost` in `stages`, the first stage outermost; None entries are skipped."""
    handler = innermost
    for stage in reversed(stages):
        if stage is not None:
            handler = stage(handler)
    return handler


def build_chain(
    route: RouteConfig,
    forward: Handler,
    global_body_limit: int | None,
    rate_limits: RateLimitStore | None = None,
) -> Chain:
    """The stages of one route around its forwarder. This list *is* the order."""
    stages: list[tuple[str, Stage | None]] = [  # outermost first
        # cors, then auth go here (auth sets exchange.consumer, which rate_limit may key on)
        ("rate_limit", None if rate_limits is None else rate_limit_stage(route, rate_limits)),
        ("body_limit", body_limit_stage(body_limit_of(route, global_body_limit))),
        ("headers", headers_stage(route.request_headers, route.response_headers)),
    ]
    names = tuple(name for name, stage in stages if stage is not None)
    return Chain(compose([stage for _, stage in stages], forward), (*names, "forward"))


def body_limit_of(route: RouteConfig, global_limit: int | None) -> int | None:
    """The limit that applies to a route: the smaller of its own and the global one."""
    if route.max_body_bytes is None:
        return global_limit
    if global_limit is None:
        return route.max_body_bytes
    return min(route.max_body_bytes, global_limit)


class Chain(NamedTuple):
    handler: Handler
    stages: tuple[str, ...]  # names, outermost first, ending in "forward"
