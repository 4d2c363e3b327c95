"""DNS service discovery: a service with `discovery: {dns: {interval}}` follows its names.

Every `interval` each target whose URL names a host (`http://inventory.internal:8001`) is
resolved again, off the event loop (`loop.getaddrinfo`: /etc/hosts, search domains and the
system's DNS, as any program on the machine sees them), and each address becomes a target of
its own, with the target's weight, its own health verdict and its own circuit breaker. This
is what Kubernetes headless services and Consul DNS hand out: one A record per ready pod.

  - An address that stays keeps its `Target`: health, circuit and in-flight count go on.
  - An address that disappears is drained, not cut: it gets no new request, and requests in
    flight on it finish (`Service.replace_targets`).
  - A failed resolution (an error or no address) keeps the last good set, and says so in the
    log once per outage. Until the first resolution succeeds the target is served as written,
    so aiohttp resolves the name itself on each new connection.
  - A target that names an address (`http://10.0.0.5:8001`) is kept as it is.

Labels stay free of addresses (the URL may come from an expanded ${VAR}): the addresses of
target `inventory#0` are `inventory#0.1`, `inventory#0.2`, ... in the order they are first
seen, and an address keeps its label while it stays. The Host header and, for https, the name
the certificate must match remain the host name of the URL as written. A reload that keeps
the target hands its addresses, with their state, to the new `Service` at once (`sync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from typing import Protocol

from yarl import URL

from gateway.config.model import TargetConfig
from gateway.upstream.breaker import AlwaysClosed, CircuitBreaker
from gateway.upstream.service import Service, Target

upstream_log = logging.getLogger("gateway.upstream")


class Resolver(Protocol):
    """Resolve a host name to its addresses (textual, any order); raise OSError or return
    nothing when it cannot."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The system's resolver through `loop.getaddrinfo` (a thread under asyncio, libuv's
    pool under uvloop): never blocks the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Template:
    """One configured target whose host is a name, and the addresses found for it."""

    def __init__(self, index: int, static: Target) -> None:
        self.index = index
        self.static = static  # the target as written: served until a resolution succeeds
        url = URL(static.url, encoded=True)
        self.url = url
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.host_header = self.host if url.is_default_port() else f"{self.host}:{url.port}"
        self.found: dict[str, Target] | None = None  # address -> target; None: none yet
        self.counter = 0  # the last label number handed out
        self.failing = False  # the current outage was logged

    def targets(self) -> list[Target]:
        return [self.static] if self.found is None else list(self.found.values())

    def update(self, service: Service, addresses: Iterable[str]) -> None:
        """The new address set: keep the targets of addresses that stay, make new ones."""
        old = self.found or {}
        found: dict[str, Target] = {}
        for address in sorted(set(addresses)):
            found[address] = old.get(address) or self._new_target(service, address)
        self.found = found

    def _new_target(self, service: Service, address: str) -> Target:
        self.counter += 1
        label = f"{self.static.label}.{self.counter}"
        breaker = _breaker(service, label)
        url = str(self.url.with_host(address)).rstrip("/")
        https = self.url.scheme == "https"
        return Target(
            TargetConfig(url, self.static.config.weight),
            label,
            breaker,
            host_header=self.host_header,
            server_hostname=self.host if https else None,
        )

    def adopt(self, previous: _Template, service: Service) -> None:
        """A reload kept this target: take over its addresses and their state."""
        self.counter = previous.counter
        if previous.found is None:
            return
        self.found = {}
        for address, old in previous.found.items():
            target = Target(
                old.config,
                old.label,
                old.breaker,
                host_header=old.host_header,
                server_hostname=old.server_hostname,
            )
            breaker = _breaker(service, old.label)
            if type(old.breaker) is type(breaker):  # the same kind: keep its state
                old.breaker.config = breaker.config
            else:
                target.breaker = breaker
            if service.config.health_check is not None:  # else nothing would bring it back
                target.healthy = old.healthy
            self.found[address] = target


def _breaker(service: Service, label: str) -> CircuitBreaker | AlwaysClosed:
    config = service.config.circuit_breaker
    if config is None:
        return AlwaysClosed(label, time.monotonic)
    return CircuitBreaker(label, config, time.monotonic)


class ServiceDiscovery:
    """The discovered targets of one service; `refresh()` resolves every name once."""

    def __init__(self, service: Service, resolver: Resolver) -> None:
        self.service = service
        self.resolver = resolver
        self.layout: list[_Template | Target] = [
            t if _is_address(URL(t.url, encoded=True).raw_host or "") else _Template(i, t)
            for i, t in enumerate(service.targets)
        ]

    @property
    def templates(self) -> list[_Template]:
        return [t for t in self.layout if isinstance(t, _Template)]

    def adopt(self, previous: ServiceDiscovery) -> None:
        """Take over the addresses `previous` found for the targets both have (same URL)."""
        before = {t.url: t for t in previous.templates}
        for template in self.templates:
            old = before.get(template.url)
            if old is not None and old.static.config.weight == template.static.config.weight:
                template.adopt(old, self.service)
        self._apply()

    async def refresh(self) -> None:
        """Resolve every name; a name that fails keeps its last good addresses."""
        templates = self.templates
        results = await asyncio.gather(
            *(self.resolver.resolve(t.host, t.port) for t in templates), return_exceptions=True
        )
        for template, result in zip(templates, results, strict=True):
            if isinstance(result, BaseException) or not result:
                if not isinstance(result, Exception | list):
                    raise result  # cancelled: not an answer
                self._failed(template, result)
                continue
            if template.failing:
                template.failing = False
                upstream_log.info("%s: its name resolves again", template.static.label)
            template.update(self.service, result)
        self._apply()

    def _failed(self, template: _Template, error: Exception | list[str]) -> None:
        if template.failing:
            return
        template.failing = True
        why = "no address" if isinstance(error, list) else type(error).__name__
        kept = "the target as written" if template.found is None else "the last addresses"
        upstream_log.warning(
            "%s: its name did not resolve (%s); keeping %s", template.static.label, why, kept
        )

    def _apply(self) -> None:
        targets: list[Target] = []
        for entry in self.layout:
            targets.extend(entry.targets() if isinstance(entry, _Template) else [entry])
        current = self.service.targets
        if list(current) != targets:
            added = [t.label for t in targets if t not in current]
            gone = [t.label for t in current if t not in targets]
            self.service.replace_targets(tuple(targets))
            upstream_log.info(
                "service %r: %d targets (added %s, draining %s)",
                self.service.name,
                len(targets),
                ", ".join(added) or "none",
                ", ".join(gone) or "none",
            )

    async def run(self) -> None:
        discovery = self.service.config.discovery
        assert discovery is not None  # Discovery.sync starts only services that have it
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug: say so, and keep refreshing (asyncio would stay silent)
                upstream_log.exception("discovery for service %r failed", self.service.name)
            await asyncio.sleep(discovery.interval)


class Discovery:
    """One refresher task per service with `discovery`; `sync()` after each swap, as the
    health checker. `resolver` is the system's unless a test steers its own."""

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver: Resolver = resolver or SystemResolver()
        self._running: dict[str, tuple[ServiceDiscovery, asyncio.Task[None]]] = {}

    def of(self, name: str) -> ServiceDiscovery | None:
        entry = self._running.get(name)
        return None if entry is None else entry[0]

    def sync(self, services: Iterable[Service]) -> None:
        """Follow exactly `services` (those with discovery). A service a reload replaced gets
        its predecessor's addresses at once, then a fresh task (which resolves first)."""
        current = {s.name: s for s in services if s.config.discovery is not None}
        loop = asyncio.get_running_loop()
        for name, (found, task) in list(self._running.items()):
            if current.get(name) is not found.service:
                task.cancel()
                del self._running[name]
                service = current.get(name)
                if service is not None:  # replaced: the new one starts where this one was
                    successor = ServiceDiscovery(service, self.resolver)
                    successor.adopt(found)
                    self._start(loop, successor)
        for name, service in current.items():
            if name not in self._running:
                self._start(loop, ServiceDiscovery(service, self.resolver))

    def _start(self, loop: asyncio.AbstractEventLoop, found: ServiceDiscovery) -> None:
        task = loop.create_task(found.run(), name=f"discovery {found.service.name}")
        self._running[found.service.name] = (found, task)

    async def stop(self) -> None:
        tasks = [task for _, task in self._running.values()]
        self._running.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
