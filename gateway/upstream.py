"""A service's targets and the one way to send a request to it.

`Service.send` picks a target with the balancer, skips targets that are down (active health)
or whose circuit is open (passive health), retries what may be retried on another target
within the retry budget, and hands back a response the forwarder streams. Every route and
every fan-out part calls it; the forwarder knows nothing of targets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from yarl import URL

from gateway.balance import make_balancer
from gateway.breaker import Circuit, CircuitBreaker, Clock, RetryBudget
from gateway.errors import NoHealthyTarget, UpstreamError, UpstreamTimeout, upstream_errors
from gateway.exchange import Exchange
from gateway.model import IDEMPOTENT_METHODS, ServiceConfig, TargetConfig, Timeouts

upstream_log = logging.getLogger("gateway.upstream")

RETRY_STATUSES: Final = frozenset({502, 503, 504})
_CONNECT_ERRORS: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
Body = aiohttp.StreamReader | AsyncIterable[bytes] | None


@dataclass(slots=True, eq=False)
class Target:
    config: TargetConfig
    label: str  # "inventory#0": what logs and metrics show instead of the address
    breaker: CircuitBreaker
    healthy: bool = True  # the active health check's verdict; True until a probe says no
    in_flight: int = 0
    current_weight: int = 0  # smooth weighted round-robin state

    @property
    def url(self) -> str:
        return self.config.url

    def available(self) -> bool:
        return self.healthy and self.breaker.allows()


class Reply:
    """An upstream response and the target it holds; `release()` exactly once when done."""

    __slots__ = ("response", "target")

    def __init__(self, response: aiohttp.ClientResponse, target: Target) -> None:
        self.response = response
        self.target = target

    def release(self) -> None:
        self.target.in_flight -= 1
        self.response.release()


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeouts.total,
        connect=timeouts.connect,
        sock_connect=timeouts.connect,
        sock_read=timeouts.read,
    )


def make_session(config: ServiceConfig) -> aiohttp.ClientSession:
    """One keep-alive pool per service. Cookies are never stored: clients share the pool."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=config.max_connections, limit_per_host=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=client_timeout(config.timeouts),
        read_bufsize=2**18,
    )


class Service:
    """Runtime side of a ServiceConfig: targets, balancer, breakers, pool and retry budget."""

    def __init__(self, config: ServiceConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.name = config.name
        self.targets = tuple(
            Target(
                t,
                f"{config.name}#{i}",
                CircuitBreaker(f"{config.name}#{i}", config.circuit_breaker, clock),
            )
            for i, t in enumerate(config.targets)
        )
        self.balancer = make_balancer(config.balance)
        self.budget = RetryBudget(config.retry_budget, clock)
        self.timeout = client_timeout(config.timeouts)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: it needs a running loop
            self._session = make_session(self.config)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def has_available_target(self) -> bool:
        return any(t.available() for t in self.targets)

    def pick(self, tried: tuple[Target, ...] = ()) -> Target:
        candidates = [t for t in self.targets if t.available() and t not in tried]
        if not candidates:
            raise NoHealthyTarget(
                f"service {self.name!r} has no healthy target",
                headers={"Retry-After": str(self._retry_after())},
            )
        target = self.balancer.pick(candidates)
        target.breaker.claim()
        return target

    def _retry_after(self) -> int:
        waits = [t.breaker.reopens_in() for t in self.targets if t.breaker.state is Circuit.OPEN]
        interval = self.config.health_check.interval if self.config.health_check else 5.0
        return max(1, math.ceil(min(waits, default=interval)))

    async def send(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: Body,
        exchange: Exchange,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Reply:
        """Send to a target, retrying on another one where that is safe; see module docstring."""
        retryable = self.config.retries > 0 and method in IDEMPOTENT_METHODS and body is None
        if self.config.retries:
            self.budget.record_request()
        tried: tuple[Target, ...] = ()
        while True:
            target = self.pick(tried) if not tried else self._next(tried)
            tried = (*tried, target)
            exchange.target = target.label
            try:
                reply = await self._attempt(
                    target, method, path_qs, headers, body, exchange, timeout
                )
            except UpstreamError as error:
                # Nothing reached the target when the connection failed: even a POST may go
                # elsewhere. A read timeout is not retried: the target may still be working.
                connect_failed = isinstance(error.__cause__, _CONNECT_ERRORS)
                timed_out = isinstance(error, UpstreamTimeout) and not connect_failed
                if timed_out or not self._may_retry(retryable or connect_failed, tried):
                    raise
                exchange.retries += 1
                continue
            if reply.response.status in RETRY_STATUSES and self._may_retry(retryable, tried):
                reply.release()
                exchange.retries += 1
                continue
            return reply

    def _next(self, tried: tuple[Target, ...]) -> Target:
        """A retry goes to a target not tried yet when there is one, else any available one."""
        try:
            return self.pick(tried)
        except NoHealthyTarget:
            return self.pick()

    def _may_retry(self, retryable: bool, tried: tuple[Target, ...]) -> bool:
        if not retryable or len(tried) > self.config.retries:
            return False
        if not self.has_available_target():
            return False
        return self.budget.try_spend()

    async def _attempt(
        self,
        target: Target,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: Body,
        exchange: Exchange,
        timeout: aiohttp.ClientTimeout | None,
    ) -> Reply:
        target.in_flight += 1
        try:
            with upstream_errors(self.name):
                response = await self.session.request(
                    method,
                    URL(target.url + path_qs, encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=timeout or self.timeout,
                )
        except UpstreamError as error:
            target.in_flight -= 1
            if exchange.body_error is not None:  # our side cut the body: not the target's fault
                raise exchange.body_error from error
            target.breaker.failure()
            upstream_log.warning("%s: %s", target.label, error.detail)
            raise
        except BaseException:  # cancelled by a client disconnect: not the target's fault
            target.in_flight -= 1
            raise
        if response.status in RETRY_STATUSES:
            target.breaker.failure()
        else:
            target.breaker.success()
        return Reply(response, target)


async def close_later(services: list[Service], grace: float) -> None:
    """Close the pools of services a reload removed, once their requests are done."""
    deadline = time.monotonic() + grace
    busy = True
    while busy and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        busy = any(t.in_flight for s in services for t in s.targets)
    for service in services:
        await service.close()
