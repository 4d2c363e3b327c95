"""The request pipeline: what a handler and a stage are, and the order stages run in.

`build_chain` is the only place the order is written. A stage factory returns None when its
route does not configure the feature, so an unconfigured feature costs nothing per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from aiohttp import web

from gateway.auth.policy import RoutePolicy
from gateway.model import RouteConfig
from gateway.ratelimit.store import RateLimitStore
from gateway.stages.auth import auth_stage
from gateway.stages.bodylimit import body_limit_stage
from gateway.stages.cors import cors_stage
from gateway.stages.headers import headers_stage
from gateway.stages.ratelimit import rate_limit_stage

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Stage = Callable[[Handler], Handler]


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
    auth: RoutePolicy | None = None,
) -> Chain:
    """The stages of one route around its forwarder. This list *is* the order."""
    stages: list[tuple[str, Stage | None]] = [  # outermost first
        ("cors", cors_stage(route)),  # preflights are answered before auth
        ("auth", auth_stage(auth)),  # before any body byte is read; sets the consumer
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
