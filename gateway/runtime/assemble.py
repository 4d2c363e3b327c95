"""The model to a RouteTable: each route's chain is built here, once per load.

`build_chain` is the only place the order of stages is written. A stage factory returns None
when its route does not configure the feature, so an unconfigured feature costs nothing per
request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import assert_never

from gateway.actions.aggregate import aggregate_action
from gateway.actions.compose import compose_action
from gateway.actions.forward import forward_action
from gateway.auth.apikeys import ApiKeyAuthenticator
from gateway.auth.forward import forward_authenticator
from gateway.auth.identity import Authenticator, Method
from gateway.auth.jwks import JwksStore
from gateway.auth.jwt import JwtAuthenticator, JwtRules, StaticKey, VerifyKey
from gateway.auth.policy import RoutePolicy
from gateway.cache.policy import UNSAFE_METHODS
from gateway.cache.process import ResponseCache
from gateway.config.jwtkeys import ALGORITHM_KEYS
from gateway.config.jwtkeys import load_public_key as _public_key
from gateway.config.model import (
    AggregateAction,
    ComposeAction,
    ForwardAction,
    GatewayConfig,
    JwtConfig,
    RouteConfig,
)
from gateway.http.pipeline import Action, Chain, Lane, RequestStage, ResponseStage
from gateway.http.proxies import ClientAddress
from gateway.http.routing import Route, RouteTable
from gateway.ratelimit.memory import MemoryStore
from gateway.ratelimit.store import GuardedStore
from gateway.stages.auth import auth_stage
from gateway.stages.bodylimit import BodyLimitStage, body_limit_stage
from gateway.stages.cache import CacheStage, InvalidateStage
from gateway.stages.cors import cors_stage
from gateway.stages.headers import HeadersStage, headers_stage
from gateway.stages.ratelimit import rate_limit_stage
from gateway.upstream.service import Service


def authenticators(
    config: GatewayConfig, services: Mapping[str, Service], jwks: JwksStore
) -> dict[Method, Authenticator]:
    """One authenticator per method configured at the top level, shared by its routes."""
    auth = config.auth
    found: dict[Method, Authenticator] = {}
    forward = forward_authenticator(config.forward_auth, services)
    if forward is not None:
        found["forward"] = forward
    if auth.jwt is not None:
        found["jwt"] = _jwt_authenticator(auth.jwt, jwks)
    if auth.api_keys is not None:
        found["api_key"] = ApiKeyAuthenticator(
            (k.key_sha256, k.consumer, k.scopes) for k in auth.api_keys
        )
    return found


def _jwt_authenticator(config: JwtConfig, jwks: JwksStore) -> JwtAuthenticator:
    rules = JwtRules(
        config.algorithms, config.issuer, config.audience, config.leeway, config.consumer_claim
    )
    pinned = tuple(sorted(config.algorithms))
    if config.jwks_url is not None:
        return JwtAuthenticator(rules, jwks.keys(config.jwks_url, config.jwks_refresh))
    if config.secret is not None:
        return JwtAuthenticator(rules, StaticKey(VerifyKey(config.secret, pinned)))
    assert config.public_key_pem is not None
    key = _public_key(config.public_key_pem)
    assert all(ALGORITHM_KEYS[a] != "hmac" for a in pinned)  # validated: never a secret
    return JwtAuthenticator(rules, StaticKey(VerifyKey(key, pinned)))


def build_table(
    config: GatewayConfig,
    services: Mapping[str, Service],
    rate_limits: MemoryStore | GuardedStore | None = None,
    jwks: JwksStore | None = None,
    cache: ResponseCache | None = None,
) -> RouteTable:
    """Build every route's chain once; requests only look the result up. `rate_limits` is
    the process's store and `jwks` its key sets (both kept across reloads); None: fresh ones."""
    rate_limits = MemoryStore() if rate_limits is None else rate_limits
    methods = authenticators(config, services, jwks or JwksStore())
    routes = []
    for route in config.routes:
        auth = route.auth
        policy = None
        if auth is not None:
            policy = RoutePolicy(
                auth.any_of, methods, auth.scopes, auth.consumers, auth.strip_credentials
            )
        action, name = build_action(route, config, services)
        cached = cache_stage(route, cache)
        if isinstance(cached, CacheStage):
            action = cached.guard(action)  # stale_if_error: an upstream failure answered stale
        chain = build_chain(route, action, name, config.max_body_bytes, rate_limits, policy, cached)
        routes.append(Route(route, chain))
    return RouteTable(routes, ClientAddress(config.trusted_proxies))


def build_action(
    route: RouteConfig, config: GatewayConfig, services: Mapping[str, Service]
) -> tuple[Action, str]:
    """The one action a route declares, and its name for /routes."""
    action = route.action
    match action:
        case ForwardAction():
            return forward_action(route, services[action.service], config.max_message_bytes), (
                "forward"
            )
        case AggregateAction():
            return aggregate_action(route, action, services), "aggregate"
        case ComposeAction():
            return compose_action(route, action, services), "compose"
        case _:
            assert_never(action)


def cache_stage(
    route: RouteConfig, cache: ResponseCache | None
) -> CacheStage | InvalidateStage | None:
    """A cached route's cache stage; on the others, when some route caches, the one that drops
    entries after a successful write (a write may take another route than the reads)."""
    if cache is None:
        return None
    if route.cache is not None:
        return CacheStage(route, cache.store, cache.coalescer, cache.invalidator)
    if route.methods & UNSAFE_METHODS:
        return InvalidateStage(cache.invalidator)
    return None


def build_chain(
    route: RouteConfig,
    action: Action,
    action_name: str,
    global_body_limit: int | None,
    rate_limits: MemoryStore | GuardedStore | None = None,
    auth: RoutePolicy | None = None,
    cache: CacheStage | InvalidateStage | None = None,
) -> Chain:
    """The stages of one route, by phase, around its action. This list *is* the order: the
    request phase runs it top down, the response phase bottom up."""
    stages: list[tuple[str, object | None]] = [
        ("cors", cors_stage(route)),  # preflights are answered before auth
        ("auth", auth_stage(auth)),  # sets the consumer, which rate_limit may key on
        ("rate_limit", None if rate_limits is None else rate_limit_stage(route, rate_limits)),
        ("body_limit", body_limit_stage(body_limit_of(route, global_body_limit))),
        ("headers", headers_stage(route.request_headers, route.response_headers)),
        # innermost: a hit is answered after auth and limits; the entry is the upstream's
        # response as it came, and the response phase above edits hits and misses alike
        ("cache" if isinstance(cache, CacheStage) else "cache_invalidate", cache),
    ]
    present = [(name, stage) for name, stage in stages if stage is not None]
    request: list[RequestStage] = [s for _, s in present if isinstance(s, RequestStage)]
    response: list[ResponseStage] = [s for _, s in present if isinstance(s, ResponseStage)]
    names = (*(name for name, _ in present), action_name)
    return Chain(tuple(request), action, tuple(reversed(response)), names, lane_of(request))


def lane_of(request: list[RequestStage]) -> Lane | None:
    """The hit lane of a request phase that ends with the cache stage and has before it only
    stages whose work on a body-less request is synchronous and answers nothing (body limit,
    header rules); None when any other stage acts first (CORS, auth, rate limit)."""
    if not request or not isinstance(request[-1], CacheStage):
        return None
    steps = []
    for stage in request[:-1]:
        if not isinstance(stage, BodyLimitStage | HeadersStage):
            return None
        steps.append(stage.without_body)
    return Lane(tuple(steps), request[-1])


def body_limit_of(route: RouteConfig, global_limit: int | None) -> int | None:
    """The limit that applies to a route: the smaller of its own and the global one."""
    if route.max_body_bytes is None:
        return global_limit
    if global_limit is None:
        return route.max_body_bytes
    return min(route.max_body_bytes, global_limit)
