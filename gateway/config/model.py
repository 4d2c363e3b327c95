"""The compiled configuration: frozen dataclasses with units already applied.

Everything here is built once per load by `compile.py`; request handling only reads it.
Durations are seconds (float), sizes are bytes, header names are `istr`, CIDRs are networks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Final, Literal

from multidict import istr

Balance = Literal["round_robin", "least_conn"]
AuthMethod = Literal["jwt", "api_key", "forward"]
OnStoreError = Literal["allow", "deny"]
Network = IPv4Network | IPv6Network

DEFAULT_LISTEN: Final = ("0.0.0.0", 8080)
DEFAULT_ADMIN: Final = ("127.0.0.1", 9080)
DEFAULT_MAX_MESSAGE_BYTES: Final = 2**20
DEFAULT_MAX_PART_BYTES: Final = 2**20  # an aggregate part's or a compose call's body: 1 MiB
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
ALL_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float | None = 5.0  # seconds to open a connection to a target; default 5 s
    read: float | None = 60.0  # seconds of silence allowed between response bytes; default 60 s
    total: float | None = None  # seconds for the whole exchange, retries and body included;
    # default unlimited (streams)


@dataclass(frozen=True, slots=True)
class TargetConfig:
    url: str  # base URL, no trailing slash: "http://10.0.0.5:8001" or "http://h:8001/base"
    weight: int = 1  # share of traffic relative to the other targets; default 1


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str  # probed with GET on every target; 2xx/3xx is healthy
    interval: float = 5.0  # seconds between probes; default 5 s
    timeout: float = 2.0  # seconds a probe may take; default 2 s
    healthy_threshold: int = 2  # consecutive successes that bring a target back; default 2
    unhealthy_threshold: int = 3  # consecutive failures that take it out; default 3


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failures: int = 5  # consecutive failures (connect error, reset, timeout, 502/503/504); def. 5
    open_for: float = 30.0  # seconds a tripped target gets no traffic before a trial; default 30 s


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    ratio: float = 0.2  # retries allowed as a share of requests in the window; default 20 %
    window: float = 10.0  # seconds of the sliding window; default 10 s
    min_retries: int = 3  # retries allowed per window on top of the ratio; default 3


@dataclass(frozen=True, slots=True)
class DnsDiscoveryConfig:
    interval: float = 10.0  # seconds between two resolutions of each target's host name; 10 s


@dataclass(frozen=True, slots=True)
class ServiceTls:
    ca_file: str | None = None  # PEM CA bundle that replaces the system's CAs; default none
    ca_pem: str = field(default="", repr=False)  # that file's text, read at load
    verify: bool = True  # false: targets' certificates are not checked (warned on every load)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    targets: tuple[TargetConfig, ...]
    balance: Balance = "round_robin"  # round_robin (smooth weighted) | least_conn
    timeouts: Timeouts = Timeouts()
    retries: int = 0  # extra attempts for idempotent requests; default 0
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    health_check: HealthCheckConfig | None = None  # None: passive health only
    circuit_breaker: CircuitBreakerConfig | None = CircuitBreakerConfig()  # None: never eject
    # (the default of a single-target service; an explicit circuit_breaker key sets one)
    max_connections: int = 1000  # open connections per service, pooled and kept alive
    tls: ServiceTls = ServiceTls()  # how https targets are verified; default: system CAs
    discovery: DnsDiscoveryConfig | None = None  # discovery.dns: each target's host name is
    # re-resolved and every address becomes a target; None: targets as written (default)


@dataclass(frozen=True, slots=True)
class HeaderRules:
    set: tuple[tuple[istr, str], ...] = ()  # replaced (or added) with these values
    remove: frozenset[istr] = frozenset()  # dropped

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)


@dataclass(frozen=True, slots=True)
class CorsConfig:
    origins: frozenset[str]  # exact origins ("https://app.example"), or "*" for any
    methods: str  # Access-Control-Allow-Methods; default: the route's methods
    headers: str | None = None  # Access-Control-Allow-Headers; None: what a preflight asks
    credentials: bool = False  # Access-Control-Allow-Credentials: true; never with "*"
    max_age: int | None = None  # seconds a browser may keep a preflight answer; None: unsent


@dataclass(frozen=True, slots=True)
class RouteAuthConfig:
    any_of: tuple[AuthMethod, ...]  # methods tried in this order; the first identity wins
    scopes: dict[str, frozenset[str]] = field(default_factory=dict)  # METHOD or "*" -> needed
    consumers: frozenset[str] | None = None  # None: any authenticated consumer
    strip_credentials: bool = False  # drop Authorization and X-API-Key going up; default false


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """A token bucket: `burst` tokens at most, one back every `per / limit` seconds."""

    limit: int  # tokens that come back per `per`
    per: float  # seconds, parsed from "1m"
    key: str = "ip"  # "ip" | "consumer" | "header:NAME"
    burst: int = 0  # tokens a full bucket holds; default (0): `limit`
    interval_us: int = field(init=False)  # microseconds per token, at least 1 (set below)
    capacity_us: int = field(init=False)  # burst * interval_us: how far ahead a bucket may run

    def __post_init__(self) -> None:
        if self.burst <= 0:
            object.__setattr__(self, "burst", self.limit)
        interval = max(1, round(self.per * 1_000_000 / self.limit))
        object.__setattr__(self, "interval_us", interval)
        object.__setattr__(self, "capacity_us", interval * self.burst)


@dataclass(frozen=True, slots=True)
class RateLimitStoreConfig:
    redis: str | None = None  # redis://, rediss://, unix://, redis+sentinel://; None: memory
    timeout: float = 0.05  # seconds one check may take before on_store_error; default 50 ms
    on_store_error: OnStoreError = "allow"  # Redis slow or down: admit, or refuse with 503


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A route's response cache (CONTRACT §10)."""

    ttl: float  # seconds: freshness when the upstream gives none, and the cap on what it gives
    max_object_bytes: int = 2**20  # larger bodies stream through uncached; default 1 MiB
    key_by: tuple[str, ...] = ()  # "consumer" | "header:NAME", in the entry key; default none
    stale_if_error: float = 0.0  # seconds past freshness an entry answers a failure; default 0


@dataclass(frozen=True, slots=True)
class CacheStoreConfig:
    directory: str = "var/cache"  # store.cache_dir: the one SQLite file all workers share
    max_entries: int = 10000  # store.cache_max_entries: entries each worker keeps; default 10000
    max_bytes: int = 256 * 2**20  # store.cache_max_bytes: body bytes each worker keeps; 256 MiB


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str  # OTLP/HTTP URL the spans are POSTed to (the base URL + /v1/traces)
    sample_ratio: float = 1.0  # share of traces begun here that are recorded, 0..1; default 1
    service_name: str = "gateway"  # the spans' service.name; default "gateway"


@dataclass(frozen=True, slots=True)
class ForwardAction:
    """`service: NAME`: the request goes on to that service (CONTRACT §3)."""

    service: str


@dataclass(frozen=True, slots=True)
class AggregatePart:
    service: str
    path: str  # may hold {rest} and {query.NAME}
    method: str = "GET"
    required: bool = True  # a failed required part fails the answer; optional ones are null
    timeout: float | None = None  # seconds; None: the route's deadline


@dataclass(frozen=True, slots=True)
class AggregateAction:
    """`aggregate: {NAME: part, ...}`: fan out, one JSON object back (CONTRACT §11)."""

    parts: tuple[tuple[str, AggregatePart], ...]


@dataclass(frozen=True, slots=True)
class ComposeAction:
    """`compose: {handler: package.module:function}`: a Python handler (CONTRACT §11)."""

    handler: str
    # The async function itself, imported when the config was loaded (config/handlers.py).
    function: Callable[..., Awaitable[object]] | None = field(default=None, compare=False)


# What answers a route: exactly one, chosen by which key the route has.
RouteAction = ForwardAction | AggregateAction | ComposeAction


@dataclass(frozen=True, slots=True)
class RouteConfig:
    prefix: str  # normalized, no trailing slash except "/" itself
    action: RouteAction  # service | aggregate | compose
    index: int  # position in routes.yaml, shown as routes.N
    methods: frozenset[str] = ALL_METHODS  # HEAD is implied by GET
    strip_prefix: bool = False  # /api/inventory/devices -> /devices
    timeouts: Timeouts = Timeouts()  # the service's, overridden per key by the route's
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    underscores_in_headers: bool = False  # pass client header names holding "_"; default:
    # the top-level key's (false: such headers are dropped, as nginx does)
    max_body_bytes: int | None = None  # route limit, else limits.max_body_bytes; None: none
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES  # bytes of one aggregate part's or compose
    # call's answer body; a bigger one is a failure of that part; default 1 MiB
    cors: CorsConfig | None = None  # None: no CORS handling (the upstream's headers pass)
    auth: RouteAuthConfig | None = None  # None: no authentication on this route
    rate_limit: RateLimitPolicy | None = None  # None: the route is not limited
    cache: CachePolicy | None = None  # None: the route's answers are never cached
    min_body_rate: int = 500  # bytes/s a request body must average per `read` interval
    # (limits.min_body_rate; 0: only silence is cut off); default 500

    name: str = ""  # "routes.N", how logs, metrics and /routes name it (set in __post_init__)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"routes.{self.index}")

    @property
    def service(self) -> str:
        """The service a `service` route forwards to; "" for the other actions."""
        return self.action.service if isinstance(self.action, ForwardAction) else ""


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: frozenset[str]  # the `alg` values accepted; all fit the one key; never "none"
    secret: bytes | None = field(default=None, repr=False)  # HS* key from ${VAR}; never shown
    public_key_file: str | None = None  # PEM public key or certificate (RS*, PS*, ES*, EdDSA)
    public_key_pem: bytes | None = field(default=None, repr=False)  # that file, read at load
    jwks_url: str | None = None  # a JWK Set URL, fetched with aiohttp
    jwks_refresh: float = 300.0  # seconds between background JWKS refreshes; default 5 min
    issuer: str | None = None  # the `iss` required; None: not checked
    audience: str | None = None  # a value `aud` must hold; None: not checked
    leeway: float = 0.0  # seconds of clock skew allowed on exp, nbf and iat; default 0
    consumer_claim: str = "sub"  # the claim naming the consumer; default sub


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    consumer: str
    key_sha256: str  # lowercase hex SHA-256 of the key (python -m gateway hash-key)
    scopes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt: JwtConfig | None = None  # None: no route may use jwt
    api_keys: tuple[ApiKeyConfig, ...] | None = None  # None: no route may use api_key


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client connection may hold (CONTRACT §7); nginx's defaults where it has one."""

    header_timeout: float = 10.0  # seconds to receive a request's headers; default 10 s
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection is kept; default 75 s
    send_timeout: float = 60.0  # seconds a response may wait on a client that does not read
    max_client_connections: int = 10000  # open client connections per process; default 10000
    max_header_bytes: int = 16384  # bytes of all request header lines together; default 16 KiB
    max_headers: int = 100  # request header fields; default 100
    max_request_target_bytes: int = 8192  # bytes of the request target (path and query); 8 KiB


@dataclass(frozen=True, slots=True)
class ForwardAuthConfig:
    service: str  # asked through its own pools, breakers and timeouts
    path: str  # GET there, with the request's credential headers and X-Forwarded-Method/-Uri
    copy_headers: tuple[istr, ...] = ()  # headers of a 2xx answer that go upstream
    cache: float | None = None  # seconds a decision is reused per credential; None: never


@dataclass(frozen=True, slots=True)
class ListenerTls:
    cert_file: str  # PEM certificate chain of the public listener; re-read on every reload
    key_file: str  # PEM private key for it


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    file: str
    version_hash: str  # sha256 of the file bytes
    text: str  # the file as written, before ${VAR} expansion (holds no expanded secret)
    listen: tuple[str, int] = DEFAULT_LISTEN
    admin: tuple[str, int] = DEFAULT_ADMIN
    admin_ready_requires: tuple[str, ...] = ()  # services whose outage makes /readyz 503
    admin_token_sha256: str | None = field(default=None, repr=False)  # admin_auth; None: open
    access_log: str | None = None  # None: standard output
    trusted_proxies: tuple[Network, ...] = ()
    underscores_in_headers: bool = False  # routes' default for client names holding "_"
    max_body_bytes: int | None = None  # global request body limit; None: unlimited (streamed)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # one WebSocket message, bytes; 1 MiB
    shutdown_grace: float = 30.0  # seconds in-flight requests get after SIGTERM
    client_limits: ClientLimits = ClientLimits()
    auth: AuthConfig = AuthConfig()
    rate_limit_store: RateLimitStoreConfig = RateLimitStoreConfig()  # store.redis and friends
    cache_store: CacheStoreConfig = CacheStoreConfig()  # store.cache_dir, cache_max_*
    drain_timeout: float = 600.0  # seconds a service a reload replaced keeps its open
    # requests, streams and WebSockets before its pool is closed; default 10 min
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    forward_auth: ForwardAuthConfig | None = None  # auth.forward; None: not configured
    tls: ListenerTls | None = None  # None: the public listener speaks plain HTTP
    tracing: TracingConfig | None = None  # None: no traces (the default)
