"""A service's targets and the one way to send a request to it.

`Service.send` picks a target with the balancer, skips targets that are down (active health)
or whose circuit is open (passive health), retries what may be retried on another target
within the retry budget, and hands back a response the forwarder streams. Every route and
every fan-out part calls it; the forwarder knows nothing of targets.

What is retried (up to `retries` times, each retry spending from the budget):
  - a connect error or connect timeout: nothing reached the target, so any method may go on;
  - a reset before the response, or a 502/503/504: only idempotent requests (or a compose
    call with an Idempotency-Key) whose body can be sent again: none, or one of at most
    REPLAY_LIMIT bytes by Content-Length, which is read into memory first when the service
    has retries (as Envoy and nginx buffer it); a bigger or chunked body streams through once
    and is not retried;
  - never a read timeout (the target may still be working), and never once the response has
    been handed back: from then on bytes may have reached the client;
  - never a full pool: with `max_connections` requests in flight the answer is a 503 at once
    (waiting for a connection would only make the client wait, and then retry, twice).

Requests go out through the lean HTTP/1.1 client (upstream/h1client.py): one keep-alive pool
per target, all of a service's pools sharing its `max_connections`. A pooled connection that
the target closed while idle leaves the pool when the loop sees its EOF; when the close
crosses a new request instead, an idempotent request whose body is bytes or none is sent once
more on a new connection to the same target, if nothing of a response had come back (the
connection was stale, the target did not fail: not a retry, not counted). aiohttp's
ClientSession (`session`) serves WebSocket upgrades only (actions/websocket.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from aiohttp import hdrs
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway.config.model import IDEMPOTENT_METHODS, ServiceConfig, TargetConfig, Timeouts
from gateway.config.tls import client_ssl
from gateway.http.errors import (
    BadRequest,
    ClientFailure,
    GatewayError,
    NoHealthyTarget,
    PoolExhausted,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    send_failure,
)
from gateway.http.exchange import UpstreamCall
from gateway.upstream.balance import make_balancer
from gateway.upstream.breaker import (
    NOT_LET_THROUGH,
    AlwaysClosed,
    Circuit,
    CircuitBreaker,
    Clock,
    RetryBudget,
    Ticket,
    worker_count,
)
from gateway.upstream.h1client import ConnectError, Limit, Pool, Response

upstream_log = logging.getLogger("gateway.upstream")

RETRY_STATUSES: Final = frozenset({502, 503, 504})
_CONNECT_ERRORS: Final = (ConnectError, aiohttp.ClientConnectorError)  # nothing was sent
_DEFAULT_RETRY_AFTER: Final = 5.0  # seconds, when no health check or circuit says better
REPLAY_LIMIT: Final = 65536  # bytes of an idempotent request's body kept for a retry
Body = aiohttp.StreamReader | AsyncIterable[bytes] | bytes | None
Headers = list[tuple[str, str]]


class Send(Protocol):
    """`Service.send`: one request to the service, through its targets and retries. The
    `Reply` carries the call's record; a failure raises with it as `error.call`."""

    async def __call__(
        self,
        method: str,
        path_qs: str,
        headers: Headers,
        body: Body,
        timeout: aiohttp.ClientTimeout | None = None,
        *,
        kind: str = "forward",
        body_error: BodyError | None = None,
    ) -> Reply: ...


BodyError = Callable[[], Exception | None]  # why the gateway cut the request body, if it did


_CONTENT_TYPE_ONLY: Final = CIMultiDict({hdrs.CONTENT_TYPE: None})


class ProxyRequest(aiohttp.ClientRequest):
    """A client request that sends the client's headers as they are.

    aiohttp adds Accept, Accept-Encoding and User-Agent to requests that lack them, and a
    Content-Type to bodies; a proxy must not (an added Accept-Encoding would make an upstream
    compress for a client that never asked). `skip_auto_headers` does the same at a cost of a
    header copy per request; this does it for nothing. Host comes from the URL as usual."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _CONTENT_TYPE_ONLY  # consulted when the body is set


@dataclass(slots=True, eq=False)
class Target:
    config: TargetConfig
    label: str  # "inventory#0": what logs and metrics show instead of the address
    breaker: CircuitBreaker
    healthy: bool = True  # the active health check's verdict; True until a probe says no
    in_flight: int = 0  # requests sent and not yet released (least_conn reads it)
    current_weight: int = 0  # smooth weighted round-robin state
    host_header: str | None = None  # discovered: Host names the name, the URL the address
    server_hostname: str | None = None  # discovered https target: the name its TLS verifies
    pool: Pool | None = None  # its keep-alive connections; the Service sets it

    @property
    def url(self) -> str:
        return self.config.url

    def available(self) -> bool:
        return self.healthy and self.breaker.allows()


def _targets(
    config: ServiceConfig, clock: Clock, previous: Service | None, pool: Callable[[str], Pool]
) -> tuple[Target, ...]:
    """The service's targets. A target whose URL the `previous` version of the service also
    had keeps that one's health verdict and circuit breaker (a reload that changes another
    setting must not bring a target the checks took out back, nor forget an open circuit)."""
    left = list(previous.targets) if previous is not None else []
    targets = []
    for i, target_config in enumerate(config.targets):
        label = f"{config.name}#{i}"
        breaker = (
            CircuitBreaker(label, config.circuit_breaker, clock)
            if config.circuit_breaker is not None
            else AlwaysClosed(label, clock)
        )
        target = Target(target_config, label, breaker, pool=pool(target_config.url))
        old = next((t for t in left if t.url == target_config.url), None)
        if old is not None:
            left.remove(old)
            if type(old.breaker) is type(breaker):  # the same kind: keep its state
                old.breaker.name, old.breaker.config = label, breaker.config
                target.breaker = old.breaker
            if config.health_check is not None:  # else nothing would ever bring it back
                target.healthy = old.healthy
        targets.append(target)
    return tuple(targets)


class Reply:
    """An upstream response, the target it holds and the call's record; `release()` when done
    (twice is safe)."""

    __slots__ = ("_released", "call", "response", "target")

    def __init__(self, response: Response, target: Target, call: UpstreamCall) -> None:
        self.response = response
        self.target = target
        self.call = call
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.target.in_flight -= 1
        self.response.release()  # back to the pool, or closed when the body did not all come


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeouts.total,
        connect=timeouts.connect,
        sock_connect=timeouts.connect,
        sock_read=timeouts.read,
    )


@functools.lru_cache(maxsize=256)
def lean_timeouts(timeout: aiohttp.ClientTimeout) -> Timeouts:
    """`client_timeout` undone: what the lean client takes (a route's override is one object
    made at compile time, so this is a cache hit per request)."""
    connect = timeout.sock_connect if timeout.sock_connect is not None else timeout.connect
    return Timeouts(connect=connect, read=timeout.sock_read, total=timeout.total)


UPSTREAM_RCVBUF: Final = 65536  # bytes; the kernel doubles it for its own bookkeeping
# What the lean client's sockets get: the same cap, so a download to a client that stopped
# reading holds at most this in the kernel (plus h1client's PAUSE_AT in the process).
LEAN_RCVBUF: Final = UPSTREAM_RCVBUF


def _upstream_socket(info: tuple[int, int, int, str, tuple[object, ...]]) -> socket.socket:
    """An upstream socket with a small receive buffer. One read takes what the kernel holds
    (up to 256 KiB by default), and a response relayed to a client that stops reading keeps
    the last read in the upstream reader and the one before in the client's send buffer:
    smaller reads are what keeps a stalled download to a few hundred KiB (bench: hostile)."""
    family, kind, proto, _, _ = info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RCVBUF)
    return sock


def _ssl_context(config: ServiceConfig) -> ssl.SSLContext | None:
    """The TLS context of the service's https targets: the contexts aiohttp made at import
    (system CAs, or none checked when `tls.verify` is off), or one with the service's CAs."""
    if not any(t.url.startswith("https:") for t in config.targets):
        return None
    chosen = client_ssl(config.tls)
    if isinstance(chosen, ssl.SSLContext):
        return chosen
    connector = aiohttp.connector
    return connector._SSL_CONTEXT_VERIFIED if chosen else connector._SSL_CONTEXT_UNVERIFIED


def make_session(config: ServiceConfig) -> aiohttp.ClientSession:
    """aiohttp's pool for the service's WebSocket upgrades. Cookies are never stored."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=config.max_connections,
            limit_per_host=0,
            socket_factory=_upstream_socket,
            ssl=client_ssl(config.tls),
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        request_class=ProxyRequest,
        timeout=client_timeout(config.timeouts),
        read_bufsize=2**16,  # reader pauses the upstream past 2x this: see _upstream_socket
    )
    # aiohttp silently re-sends an idempotent request once, to the same target, when its
    # connection drops before the answer. Retries are this layer's: counted, budgeted, seen by
    # the breaker and sent to another target. (aiohttp's own test client turns it off so too.)
    session._retry_connection = False
    return session


class Service:
    """Runtime side of a ServiceConfig: targets, balancer, breakers, pool and retry budget."""

    def __init__(
        self, config: ServiceConfig, clock: Clock = time.monotonic, previous: Service | None = None
    ) -> None:
        """`previous`: the service this one replaces on a reload (see `_targets`)."""
        self.config = config
        self.name = config.name
        self._limit = Limit(config.max_connections)
        self._ssl = _ssl_context(config)
        self._timeouts = config.timeouts
        self.targets = _targets(config, clock, previous, self._pool)
        self.balancer = make_balancer(config.balance)
        self._single = self.targets[0] if len(self.targets) == 1 else None
        self._draining: list[Target] = []  # left out by discovery, requests still in flight
        self._max_connections = config.max_connections
        self._reading = 0  # requests reading their body into memory before the first attempt
        self.budget = RetryBudget(config.retry_budget, clock, worker_count())  # 1/N: breaker.py
        self.timeout = client_timeout(config.timeouts)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Send to a target, retrying on another one where that is safe (module docstring).
        # `timeout` (a route's override) defaults to the service's; its `total` bounds the
        # whole exchange, retries included.
        self.send: Send = self._send_retrying if config.retries else self._attempt

    def _pool(
        self, url: str, host_header: str | None = None, server_hostname: str | None = None
    ) -> Pool:
        return Pool(
            url,
            self._limit,
            self._timeouts,
            ssl=self._ssl,
            rcvbuf=LEAN_RCVBUF,
            host_header=host_header,
            server_hostname=server_hostname,
        )

    def _pool_of(self, target: Target) -> Pool:
        """A target made elsewhere (DNS discovery, tests) gets its pool when first used; a
        discovered one names its host in Host and in TLS, and is reached at its address."""
        target.pool = self._pool(target.url, target.host_header, target.server_hostname)
        return target.pool

    @property
    def session(self) -> aiohttp.ClientSession:
        """aiohttp's pool, for WebSocket upgrades only (actions/websocket.py)."""
        if self._session is None:  # created lazily: it needs a running loop
            if self._closed:  # never open a pool nobody would close
                raise UpstreamUnavailable(f"service {self.name!r} was removed")
            self._session = make_session(self.config)
        return self._session

    @property
    def closed(self) -> bool:
        """True once `close()` ran: a reload removed the service, or shutdown."""
        return self._closed

    @property
    def busy(self) -> bool:
        """A request is using the service: sent and not released, or reading its body."""
        return self._reading > 0 or any(t.in_flight for t in (*self.targets, *self._draining))

    def replace_targets(self, targets: tuple[Target, ...]) -> None:
        """Serve `targets` from now on (DNS discovery; one assignment, so a request sees the
        old set or the new one). A target left out gets no new request; those in flight
        finish on it (a `Reply` holds its target) and keep the pool open (`busy`)."""
        gone = [t for t in self.targets if t not in targets]
        self._draining = [t for t in (*self._draining, *gone) if t.in_flight and t not in targets]
        self.targets, self._single = targets, targets[0] if len(targets) == 1 else None

    async def close(self) -> None:
        """Close every connection; a response still streaming breaks (its client sees a
        broken body, as for any upstream failure mid-response)."""
        self._closed = True
        for target in self.targets:
            if target.pool is not None:
                target.pool.abort()
        if self._session is not None:
            _end_streams(self._session)
            await self._session.close()

    def _exhausted(self) -> PoolExhausted:
        """max_connections requests are in flight: 503 at once, never queued or retried."""
        return PoolExhausted(
            f"service {self.name!r} has no free connection (max_connections)",
            headers={"Retry-After": "1"},
        )

    def _pool_full(self) -> bool:
        if self._single is not None:
            return self._single.in_flight >= self._max_connections
        return sum(t.in_flight for t in self.targets) >= self._max_connections

    def has_available_target(self) -> bool:
        return any(t.available() for t in self.targets)

    def choose(self, tried: Sequence[Target] = ()) -> tuple[Target, Ticket]:
        """Choose and claim a target: (target, the breaker's ticket for this request). A
        caller that connects itself (WebSocket) reports `breaker.success()`, `failure()` or
        `abandon(ticket)`. A retry avoids the targets in `tried` when it can."""
        if self._single is not None and not tried:  # one target: nothing to balance
            if self._single.available():
                return self._single, self._single.breaker.claim()
            candidates = []
        elif tried:
            candidates = [t for t in self.targets if t.available() and t not in tried]
        else:
            candidates = [t for t in self.targets if t.available()]
        if not candidates and tried:
            candidates = [t for t in self.targets if t.available()]
        if not candidates:
            raise self._none_healthy()
        target = self.balancer.pick(candidates)
        return target, target.breaker.claim()

    def _none_healthy(self) -> NoHealthyTarget:
        return NoHealthyTarget(
            f"service {self.name!r} has no healthy target",
            headers={"Retry-After": str(self._retry_after())},
        )

    def _retry_after(self) -> int:
        """Seconds until some target may take traffic again (at least 1)."""
        return max(1, math.ceil(min(self._back_in(t) for t in self.targets)))

    def _back_in(self, target: Target) -> float:
        if not target.healthy:  # the probes it needs to pass before it comes back
            check = self.config.health_check
            return check.interval * check.healthy_threshold if check else _DEFAULT_RETRY_AFTER
        if target.breaker.state is Circuit.OPEN:
            return target.breaker.reopens_in()
        return 1.0  # half-open: its trial is deciding now

    async def _send_retrying(
        self,
        method: str,
        path_qs: str,
        headers: Headers,
        body: Body,
        timeout: aiohttp.ClientTimeout | None = None,
        *,
        kind: str = "forward",
        body_error: BodyError | None = None,
    ) -> Reply:
        """`send` for a service with retries: attempts on different targets while that is
        safe (see the module docstring) and the budget and the total deadline allow."""
        call = UpstreamCall(self.name, kind)
        started = call.started = time.perf_counter()
        timeout = timeout or self.timeout
        deadline = None if timeout.total is None else self._clock() + timeout.total
        self._reading += 1  # a reload must not close the pool under it (see `busy`)
        try:
            body, replayable = await self._replayable(method, headers, body, kind)
        except GatewayError as error:
            error.call = call
            raise
        finally:
            self._reading -= 1
        self.budget.record_request()
        tried: list[Target] = []
        while True:
            attempt_timeout = _until(timeout, deadline, self._clock)
            try:
                reply = await self._attempt(
                    method,
                    path_qs,
                    headers,
                    body,
                    attempt_timeout,
                    body_error=body_error,
                    call=call,
                    tried=tried,
                )
            except UpstreamError as error:
                if not self._may_retry(_retryable(error, replayable), tried, deadline):
                    call.ms = (time.perf_counter() - started) * 1000
                    raise
            else:
                status = reply.response.status
                if status not in RETRY_STATUSES or not self._may_retry(replayable, tried, deadline):
                    call.ms = (time.perf_counter() - started) * 1000
                    return reply
                reply.release()

    async def _replayable(
        self, method: str, headers: Headers, body: Body, kind: str = "forward"
    ) -> tuple[Body, bool]:
        """(the body to send, may the request be sent again); see the module docstring. A
        compose handler's call (kind "call") that carries an Idempotency-Key may be, too."""
        if method not in IDEMPOTENT_METHODS and not (kind == "call" and _keyed(headers)):
            return body, False
        if body is None or isinstance(body, bytes):
            return body, True
        length = _content_length(headers)
        if not self.config.retries or length is None or length > REPLAY_LIMIT:
            return body, False
        try:
            if isinstance(body, aiohttp.StreamReader):
                return await body.readexactly(length), True
            data = b"".join([chunk async for chunk in body])  # at most REPLAY_LIMIT bytes
        except (asyncio.IncompleteReadError, HttpProcessingError) as exc:
            raise BadRequest("the request body ended before its Content-Length") from exc
        if len(data) != length:
            raise BadRequest("the request body does not match its Content-Length")
        return data, True

    def _may_retry(self, retryable: bool, tried: Sequence[Target], deadline: float | None) -> bool:
        if not retryable or len(tried) > self.config.retries:
            return False
        if deadline is not None and self._clock() >= deadline:
            return False
        if not self.has_available_target():
            return False
        return self.budget.try_spend()

    async def _attempt(
        self,
        method: str,
        path_qs: str,
        headers: Headers,
        body: Body,
        timeout: aiohttp.ClientTimeout | None = None,
        *,
        kind: str = "forward",
        body_error: BodyError | None = None,
        call: UpstreamCall | None = None,
        tried: list[Target] | None = None,
    ) -> Reply:
        """One request to one target (not one in `tried`, when it can), which is appended to
        `tried`; the breaker hears the verdict, or that there is none. Without retries this
        *is* `send` (given no `call`, it makes and times its own): one coroutine frame less
        on every request's await chain."""
        started = 0.0
        if call is None:
            started = time.perf_counter()
            call = UpstreamCall(self.name, kind, started=started)
        if self._closed:  # a request that matched a table a reload replaced long ago
            raise _failed(call, started, UpstreamUnavailable(f"service {self.name!r} was removed"))
        single = self._single
        if single is not None and not tried and single.healthy:  # `choose`, inline
            if single.in_flight >= self._max_connections:
                raise _failed(call, started, self._exhausted())
            ticket = single.breaker.claim()  # it says whether the circuit lets it through
            if ticket == NOT_LET_THROUGH:
                raise _failed(call, started, self._none_healthy())
            target = single
        else:
            if self._pool_full():  # at once: never queue for a connection, never retried
                raise _failed(call, started, self._exhausted())
            try:
                target, ticket = self.choose(tried or ())
            except UpstreamError as none_left:
                raise _failed(call, started, none_left) from None
        if tried is not None:
            tried.append(target)
        call.target = target.label
        call.attempts += 1
        target.in_flight += 1
        try:
            pool = target.pool or self._pool_of(target)
            response = await pool.request(
                method,
                path_qs,
                headers,
                body,
                self._timeouts if timeout is None else lean_timeouts(timeout),
                retry_stale=method in IDEMPOTENT_METHODS,  # the client checks the body is bytes
            )
        except (TimeoutError, ClientFailure) as exc:
            target.in_flight -= 1
            failure = send_failure(exc, self.name, body_error() if body_error else None)
            if not isinstance(failure, UpstreamError):  # the request's side: not the target's
                target.breaker.abandon(ticket)
                raise _failed(call, started, failure, "body_cut") from exc
            target.breaker.failure(ticket)
            upstream_log.warning("%s: %s", target.label, failure.detail)
            raise _failed(call, started, failure) from exc
        except BaseException:  # cancelled by a client disconnect: not the target's fault
            target.in_flight -= 1
            target.breaker.abandon(ticket)
            call.outcome = "cancelled"
            raise
        call.status, call.outcome = response.status, "ok"
        if started:
            call.ms = (time.perf_counter() - started) * 1000
        if response.status in RETRY_STATUSES:
            target.breaker.failure(ticket)
        else:
            target.breaker.success(ticket)
        return Reply(response, target, call)


def _failed(
    call: UpstreamCall, started: float, error: GatewayError, outcome: str = ""
) -> GatewayError:
    """`error`, carrying the call's record with its outcome (and its time, when this attempt
    is the whole call)."""
    call.outcome = outcome or (error.kind if isinstance(error, UpstreamError) else "error")
    if started:
        call.ms = (time.perf_counter() - started) * 1000
    error.call = call
    return error


def _end_streams(session: aiohttp.ClientSession) -> None:
    """aiohttp's close() closes every connection but leaves a response body being read
    waiting, for ever, for bytes that cannot come. Fail each one instead, so its relay drops
    the client's connection (a broken body, as for any upstream failure mid-response)."""
    connector = session.connector
    if connector is None:
        return
    for protocol in list(connector._acquired):
        if protocol._payload is not None:
            protocol._payload.set_exception(
                aiohttp.ClientConnectionError("the service's pool was closed")
            )


def _keyed(headers: Headers) -> bool:
    return any(name.lower() == "idempotency-key" for name, _ in headers)


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value) if value.isdigit() else None
    return None


def _retryable(error: UpstreamError, replayable: bool) -> bool:
    """Nothing reached the target when the connection failed: even a POST may go elsewhere.
    A read timeout is not retried: the target may still be working on the request. A full
    pool is not retried either: another attempt would find it just as full."""
    if isinstance(error, PoolExhausted):
        return False
    if isinstance(error.__cause__, _CONNECT_ERRORS):
        return True
    return replayable and not isinstance(error, UpstreamTimeout)


def _until(
    timeout: aiohttp.ClientTimeout, deadline: float | None, clock: Clock
) -> aiohttp.ClientTimeout:
    """`timeout` with its total cut to what is left of the exchange's deadline."""
    if deadline is None:
        return timeout
    return aiohttp.ClientTimeout(
        total=max(deadline - clock(), 0.001),
        connect=timeout.connect,
        sock_connect=timeout.sock_connect,
        sock_read=timeout.sock_read,
    )


_DRAIN_POLL: Final = 0.1  # seconds between two looks at a retired service's requests


async def close_later(services: list[Service], drain_timeout: float) -> None:
    """Close the pools of services a reload removed or replaced once their requests are done
    (uploads, streams and WebSockets included), or after `drain_timeout` at the latest."""
    deadline = time.monotonic() + drain_timeout
    while time.monotonic() < deadline:
        if not any(s.busy for s in services):
            break
        await asyncio.sleep(_DRAIN_POLL)
    for service in services:
        await service.close()
