"""From validated data to the frozen model: `load()` is the one loader for --check, startup
and reload. Units are applied here (durations to seconds, CIDRs to networks, header names
to istr) so request handling only looks things up. `runtime/assemble.py` turns the model
into a route table.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_network
from pathlib import Path

from multidict import istr

from gateway.config.handlers import load_handler
from gateway.config.model import (
    DEFAULT_ADMIN,
    DEFAULT_LISTEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PART_BYTES,
    AggregateAction,
    AggregatePart,
    ApiKeyConfig,
    AuthConfig,
    CachePolicy,
    CacheStoreConfig,
    CircuitBreakerConfig,
    ClientLimits,
    ComposeAction,
    CorsConfig,
    DnsDiscoveryConfig,
    ForwardAction,
    ForwardAuthConfig,
    GatewayConfig,
    HeaderRules,
    HealthCheckConfig,
    JwtConfig,
    ListenerTls,
    RateLimitPolicy,
    RateLimitStoreConfig,
    RetryBudgetConfig,
    RouteAction,
    RouteAuthConfig,
    RouteConfig,
    ServiceConfig,
    ServiceTls,
    TargetConfig,
    Timeouts,
    TracingConfig,
)
from gateway.config.read import JSON, ConfigError, Document, parse_text, read_file
from gateway.config.tls import read_ca
from gateway.config.validate import (
    key_file,
    normalize_prefix,
    parse_duration,
    route_methods,
    validate,
)


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadResult:
    return _finish(read_file(path, environ))


def load_text(
    text: str, file: str = "<string>", environ: Mapping[str, str] | None = None
) -> LoadResult:
    return _finish(parse_text(text, file, environ))


class LoadResult:
    """A compiled config (None when any error was found) and every error and warning."""

    __slots__ = ("config", "doc", "problems")

    def __init__(self, doc: Document, config: GatewayConfig | None) -> None:
        self.doc = doc
        self.config = config
        self.problems: list[ConfigError] = doc.errors

    @property
    def errors(self) -> list[ConfigError]:
        return [p for p in self.problems if not p.warning]

    @property
    def warnings(self) -> list[ConfigError]:
        return [p for p in self.problems if p.warning]


def _finish(doc: Document) -> LoadResult:
    validate(doc)
    doc.errors.sort(key=lambda e: (e.line, e.col))
    if any(not e.warning for e in doc.errors):
        return LoadResult(doc, None)
    return LoadResult(doc, build_config(doc))


def build_config(doc: Document) -> GatewayConfig:
    data: dict[str, JSON] = doc.data
    limits = data.get("limits") or {}
    services = {name: _service(name, raw) for name, raw in data["services"].items()}
    underscores = data.get("underscores_in_headers", False)
    rate = limits.get("min_body_rate", 500)
    routes = tuple(
        _route(i, raw, services, underscores, rate, doc.file)
        for i, raw in enumerate(data["routes"])
    )
    return GatewayConfig(
        file=doc.file,
        version_hash=doc.version_hash,
        text=doc.text,
        listen=_hostport(data.get("listen"), DEFAULT_LISTEN),
        admin=_hostport(data.get("admin"), DEFAULT_ADMIN),
        admin_ready_requires=tuple(data.get("admin_ready_requires", ())),
        admin_token_sha256=(data.get("admin_auth") or {}).get("token_sha256"),
        access_log=data.get("access_log"),
        trusted_proxies=tuple(ip_network(c, strict=False) for c in data.get("trusted_proxies", ())),
        underscores_in_headers=underscores,
        max_body_bytes=limits.get("max_body_bytes"),
        max_message_bytes=limits.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        shutdown_grace=_seconds(limits.get("shutdown_grace"), 30.0) or 30.0,
        client_limits=_client_limits(limits),
        auth=_auth(data.get("auth") or {}, doc.file),
        rate_limit_store=_rate_limit_store(data.get("store") or {}),
        cache_store=_cache_store(data.get("store") or {}),
        drain_timeout=_seconds(limits.get("drain_timeout"), 600.0) or 600.0,
        services=services,
        routes=routes,
        forward_auth=_forward_auth((data.get("auth") or {}).get("forward")),
        tls=_listener_tls(data.get("tls")),
        tracing=_tracing(data.get("tracing")),
    )


def _listener_tls(raw: JSON) -> ListenerTls | None:
    return None if raw is None else ListenerTls(raw["cert_file"], raw["key_file"])


def _forward_auth(raw: JSON) -> ForwardAuthConfig | None:
    if raw is None:
        return None
    return ForwardAuthConfig(
        service=raw["service"],
        path=raw["path"],
        copy_headers=tuple(istr(name) for name in raw.get("copy_headers", ())),
        cache=_seconds(raw.get("cache"), None),
    )


def _service_tls(raw: JSON) -> ServiceTls:
    if not raw:
        return ServiceTls()
    ca_file = raw.get("ca_file")
    pem = read_ca(ca_file) if ca_file else ""  # checked by validate
    return ServiceTls(ca_file=ca_file, ca_pem=pem, verify=raw.get("verify", True))


def _cors(raw: JSON, methods: frozenset[str]) -> CorsConfig | None:
    if raw is None:
        return None
    origins = frozenset(o if o == "*" else o.lower().rstrip("/") for o in raw["origins"])
    headers = raw.get("headers")
    max_age = raw.get("max_age")
    return CorsConfig(
        origins=origins,
        methods=", ".join(sorted(raw.get("methods") or methods)),
        headers=", ".join(headers) if headers else None,
        credentials=raw.get("credentials", False),
        max_age=None if max_age is None else int(parse_duration(max_age)),
    )


def _client_limits(raw: dict[str, JSON]) -> ClientLimits:
    base = ClientLimits()
    return ClientLimits(
        header_timeout=_seconds(raw.get("header_timeout"), base.header_timeout) or 0.0,
        keepalive_timeout=_seconds(raw.get("keepalive_timeout"), base.keepalive_timeout) or 0.0,
        send_timeout=_seconds(raw.get("send_timeout"), base.send_timeout) or 0.0,
        max_client_connections=raw.get("max_client_connections", base.max_client_connections),
        max_header_bytes=raw.get("max_header_bytes", base.max_header_bytes),
        max_headers=raw.get("max_headers", base.max_headers),
        max_request_target_bytes=raw.get("max_request_target_bytes", base.max_request_target_bytes),
    )


def _tracing(raw: JSON) -> TracingConfig | None:
    if raw is None:
        return None
    endpoint = raw["otlp_endpoint"].rstrip("/")
    if not endpoint.endswith("/v1/traces"):  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
        endpoint += "/v1/traces"
    return TracingConfig(
        endpoint, float(raw.get("sample_ratio", 1.0)), raw.get("service_name", "gateway")
    )


def _rate_limit_store(raw: dict[str, JSON]) -> RateLimitStoreConfig:
    return RateLimitStoreConfig(
        redis=raw.get("redis") or None,  # "" (an unset ${REDIS_URL:-}): memory
        timeout=_seconds(raw.get("timeout"), 0.05) or 0.05,
        on_store_error=raw.get("on_store_error", "allow"),
    )


def _cache_store(raw: dict[str, JSON]) -> CacheStoreConfig:
    base = CacheStoreConfig()
    return CacheStoreConfig(
        directory=raw.get("cache_dir", base.directory),
        max_entries=raw.get("cache_max_entries", base.max_entries),
        max_bytes=raw.get("cache_max_bytes", base.max_bytes),
    )


def _cache(raw: JSON) -> CachePolicy | None:
    if raw is None:
        return None
    return CachePolicy(
        ttl=parse_duration(raw["ttl"]),
        max_object_bytes=raw.get("max_object_bytes", 2**20),
        key_by=tuple(raw.get("key_by", ())),
        stale_if_error=_seconds(raw.get("stale_if_error"), 0.0) or 0.0,
    )


def _rate_limit(raw: JSON) -> RateLimitPolicy | None:
    if raw is None:
        return None
    per = parse_duration(raw["per"])
    return RateLimitPolicy(raw["limit"], per, raw.get("key", "ip"), raw.get("burst", 0))


def _hostport(text: str | None, default: tuple[str, int]) -> tuple[str, int]:
    if not text:
        return default
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _seconds(text: JSON, default: float | None) -> float | None:
    return default if text is None else parse_duration(text)


def _timeouts(raw: JSON, base: Timeouts) -> Timeouts:
    raw = raw or {}
    return Timeouts(
        connect=_seconds(raw.get("connect"), base.connect),
        read=_seconds(raw.get("read"), base.read),
        total=_seconds(raw.get("total"), base.total),
    )


def _service(name: str, raw: dict[str, JSON]) -> ServiceConfig:
    targets = tuple(
        TargetConfig(t.rstrip("/"))
        if isinstance(t, str)
        else TargetConfig(t["url"].rstrip("/"), t.get("weight", 1))
        for t in raw["targets"]
    )
    health = raw.get("health_check")
    breaker = raw.get("circuit_breaker")
    budget = raw.get("retry_budget") or {}
    return ServiceConfig(
        name=name,
        targets=targets,
        balance=raw.get("balance", "round_robin"),
        timeouts=_timeouts(raw.get("timeouts"), Timeouts()),
        retries=raw.get("retries", 0),
        retry_budget=RetryBudgetConfig(
            ratio=float(budget.get("ratio", 0.2)),
            window=_seconds(budget.get("window"), 10.0) or 10.0,
            min_retries=budget.get("min_retries", 3),
        ),
        health_check=None
        if health is None
        else HealthCheckConfig(
            path=health["path"],
            interval=_seconds(health.get("interval"), 5.0) or 5.0,
            timeout=_seconds(health.get("timeout"), 2.0) or 2.0,
            healthy_threshold=health.get("healthy_threshold", 2),
            unhealthy_threshold=health.get("unhealthy_threshold", 3),
        ),
        circuit_breaker=None  # the default never ejects a service's only target
        if breaker is None and len(targets) == 1 and "discovery" not in raw
        else CircuitBreakerConfig(
            failures=(breaker or {}).get("failures", 5),
            open_for=_seconds((breaker or {}).get("open_for"), 30.0) or 30.0,
        ),
        max_connections=raw.get("max_connections", 1000),
        tls=_service_tls(raw.get("tls")),
        discovery=_discovery(raw.get("discovery")),
    )


def _discovery(raw: JSON) -> DnsDiscoveryConfig | None:
    if raw is None:
        return None
    return DnsDiscoveryConfig(interval=_seconds(raw["dns"].get("interval"), 10.0) or 10.0)


def _headers(raw: JSON) -> HeaderRules:
    raw = raw or {}
    return HeaderRules(
        set=tuple((istr(k), str(v)) for k, v in (raw.get("set") or {}).items()),
        remove=frozenset(istr(k) for k in raw.get("remove") or ()),
    )


def _route(
    index: int,
    raw: dict[str, JSON],
    services: dict[str, ServiceConfig],
    underscores: bool,
    min_body_rate: int,
    file: str = "<string>",
) -> RouteConfig:
    action = _action(raw, file)
    base = services[action.service].timeouts if isinstance(action, ForwardAction) else Timeouts()
    methods = route_methods(raw.get("methods"))
    return RouteConfig(
        prefix=normalize_prefix(raw["prefix"]),
        action=action,
        index=index,
        methods=methods,
        strip_prefix=raw.get("strip_prefix", False),
        timeouts=_timeouts(raw.get("timeouts"), base),
        request_headers=_headers(raw.get("request_headers")),
        response_headers=_headers(raw.get("response_headers")),
        underscores_in_headers=raw.get("underscores_in_headers", underscores),
        max_body_bytes=raw.get("max_body_bytes"),
        max_part_bytes=raw.get("max_part_bytes", DEFAULT_MAX_PART_BYTES),
        cors=_cors(raw.get("cors"), methods),
        auth=_route_auth(raw.get("auth")),
        rate_limit=_rate_limit(raw.get("rate_limit")),
        cache=_cache(raw.get("cache")),
        min_body_rate=min_body_rate,
    )


def _action(raw: dict[str, JSON], file: str) -> RouteAction:
    """The route's one action (validation made sure there is exactly one)."""
    if "aggregate" in raw:
        return AggregateAction(
            tuple(
                (
                    name,
                    AggregatePart(
                        service=part["service"],
                        path=part["path"],
                        method=part.get("method", "GET"),
                        required=part.get("required", True),
                        timeout=_seconds(part.get("timeout"), None),
                    ),
                )
                for name, part in raw["aggregate"].items()
            )
        )
    if "compose" in raw:
        spec = raw["compose"]["handler"]
        function, _ = load_handler(spec, file)  # validated: imported, async, in sys.modules
        return ComposeAction(spec, function)
    return ForwardAction(raw["service"])


def _auth(raw: dict[str, JSON], file: str) -> AuthConfig:
    jwt, keys = raw.get("jwt"), raw.get("api_keys")
    return AuthConfig(
        jwt=None if jwt is None else _jwt(jwt, file),
        api_keys=None
        if keys is None
        else tuple(
            ApiKeyConfig(k["consumer"], k["key_sha256"], frozenset(k.get("scopes", ())))
            for k in keys
        ),
    )


def _jwt(raw: dict[str, JSON], file: str) -> JwtConfig:
    key_name = raw.get("public_key_file")
    secret = raw.get("secret")
    return JwtConfig(
        algorithms=frozenset(raw["algorithms"]),
        secret=None if secret is None else secret.encode(),
        public_key_file=key_name,
        public_key_pem=None if key_name is None else key_file(file, key_name).read_bytes(),
        jwks_url=raw.get("jwks_url"),
        jwks_refresh=_seconds(raw.get("jwks_refresh"), 300.0) or 300.0,
        issuer=raw.get("issuer"),
        audience=raw.get("audience"),
        leeway=_seconds(raw.get("leeway"), 0.0) or 0.0,
        consumer_claim=raw.get("consumer_claim", "sub"),
    )


def _route_auth(raw: JSON) -> RouteAuthConfig | None:
    if raw is None:
        return None
    consumers = raw.get("consumers")
    return RouteAuthConfig(
        any_of=tuple(raw["any_of"]),
        scopes={m: frozenset(s) for m, s in (raw.get("scopes") or {}).items()},
        consumers=None if consumers is None else frozenset(consumers),
        strip_credentials=raw.get("strip_credentials", False),
    )
