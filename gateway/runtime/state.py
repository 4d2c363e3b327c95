"""What a running process holds: `Gateway`, the current config, route table and services,
and the last load result. Reload builds a new table off to the side and swaps one reference;
a request keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.auth.jwks import JwksStore
from gateway.cache.process import ResponseCache
from gateway.config.build import LoadResult
from gateway.config.model import GatewayConfig, ListenerTls
from gateway.config.redact import quote_errors
from gateway.config.tls import ServerTls
from gateway.http.routing import RouteTable
from gateway.ops.accesslog import AccessLog
from gateway.ops.metrics import Metrics
from gateway.ratelimit.redisstore import client as redis_client
from gateway.ratelimit.store import RateLimits
from gateway.runtime.assemble import build_table
from gateway.runtime.reload import Reloader
from gateway.upstream.discovery import Discovery
from gateway.upstream.health import HealthChecker
from gateway.upstream.service import Service, close_later

if TYPE_CHECKING:
    from gateway.ops.tracing import Tracer

config_log = logging.getLogger("gateway.config")


@dataclass(slots=True)
class LoadStatus:
    """What /config reports about the last load or reload."""

    ok: bool
    at: float
    version_hash: str | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error_lines: list[dict[str, object]] = field(default_factory=list)  # quote_errors(...)


class Gateway:
    """The current config, route table and services of this process."""

    def __init__(
        self,
        config: GatewayConfig,
        config_path: str | None = None,
        warnings: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path  # watched for hot reload when set
        self.access_log = AccessLog()
        self.metrics = Metrics()
        self.health = HealthChecker()
        self.discovery = Discovery()  # DNS: services with `discovery` follow their names
        self.reloader: Reloader | None = None
        self.tls: ServerTls | None = None  # the public listener's, when it serves HTTPS
        self.services: dict[str, Service] = {}
        self.jwks = JwksStore()  # JWKS key sets by URL, kept across reloads
        self.rate_limits = RateLimits(self.metrics.rate_limit_store_errors.inc)
        self.metrics.watch(lambda: self.services.values())
        self.cache: ResponseCache | None = None  # made by the first config with a cached route
        self.tracer: Tracer | None = None if config.tracing is None else self._tracer(config)
        self.config = config
        self.table = RouteTable(())
        self.status = LoadStatus(True, time.time(), config.version_hash, [], list(warnings))
        self._retired: list[Service] = []  # replaced by a reload, still draining
        self._tasks: set[asyncio.Task[None]] = set()  # certificate reloads in flight
        self._retiring: set[asyncio.Task[None]] = set()  # their `_retire` tasks, kept alive
        self.swap(config)

    def _tracer(self, config: GatewayConfig) -> Tracer:
        from gateway.ops.tracing import Tracer  # the SDK is imported only when tracing is on

        assert config.tracing is not None
        return Tracer(config.tracing, lambda: self.config.routes, self._span_dropped)

    def _span_dropped(self) -> None:
        self.metrics.spans_dropped += 1

    def swap(self, config: GatewayConfig) -> list[Service]:
        """Install `config`: keep services whose config is unchanged, build the new table. A
        changed service is a new `Service` whose unchanged targets keep their health and
        circuit state; the old one is returned with the removed ones, to drain."""
        kept: dict[str, Service] = {}
        for name, service_config in config.services.items():
            old = self.services.get(name)
            kept[name] = (
                old
                if old is not None and old.config == service_config
                else Service(service_config, previous=old)
            )
        removed = [s for name, s in self.services.items() if kept.get(name) is not s]
        table = build_table(
            config,
            kept,
            self.rate_limits.store_for(config.rate_limit_store),
            self.jwks,
            self._response_cache(config),
        )
        self.services, self.table, self.config = kept, table, config  # the swap
        return removed

    def _response_cache(self, config: GatewayConfig) -> ResponseCache | None:
        if self.cache is not None:
            self.cache.check(config.cache_store)
        elif any(route.cache is not None for route in config.routes):
            url = config.rate_limit_store.redis
            redis = None if url is None else (lambda: redis_client(url, 5.0))
            self.cache = ResponseCache(config.cache_store, redis)
            store = self.cache.store
            self.metrics.watch_cache(lambda: (store.stored_bytes, store.evictions))
        return self.cache

    def apply(self, result: LoadResult) -> bool:
        """Swap in a reloaded file, or keep serving the old table and record why not."""
        warnings = [str(w) for w in result.warnings]
        if result.config is None:
            errors = [str(e) for e in result.errors]
            self.status = LoadStatus(False, time.time(), result.doc.version_hash, errors, warnings)
            self.status.error_lines = quote_errors(result.doc.text, result.errors)
            for line in errors:
                config_log.warning("reload rejected: %s", line)
            self.metrics.reloads.labels("rejected").inc()
            return False
        # Listeners are bound once: a reload changes routes and services, not addresses.
        # Tracing too: its exporter and queue live as long as the process.
        if result.config.tracing != self.config.tracing:
            config_log.warning("changing tracing needs a restart: the old settings still apply")
        config = replace(
            result.config,
            listen=self.config.listen,
            admin=self.config.admin,
            tracing=self.config.tracing,
        )
        removed = self.swap(config)
        self._reload_tls(config)
        self.health.sync(self.services.values())
        self.discovery.sync(self.services.values())
        self.metrics.reloads.labels("applied").inc()
        self.status = LoadStatus(True, time.time(), result.config.version_hash, [], warnings)
        config_log.info("reload applied: version %s", result.config.version_hash[:12])
        if removed:
            self._retired.extend(removed)  # now: a shutdown before the task runs closes them
            task = asyncio.get_running_loop().create_task(
                self._retire(removed, config.drain_timeout), name="retire services"
            )
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return True

    def _reload_tls(self, config: GatewayConfig) -> None:
        """New connections get the certificate as it is now (files re-read on every reload)."""
        if (self.tls is None) != (config.tls is None):
            config_log.warning("adding or removing tls needs a restart: the listener is bound")
        if self.tls is not None and config.tls is not None:
            task = asyncio.get_running_loop().create_task(self._swap_tls(self.tls, config.tls))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _swap_tls(self, tls: ServerTls, files: ListenerTls) -> None:
        try:
            await tls.reload(files)
        except (OSError, ssl.SSLError):
            config_log.warning("the new certificate did not load; the previous one is served")

    def request_reload(self) -> None:
        """SIGHUP: reload now."""
        if self.reloader is not None:
            self.reloader.trigger()

    async def _retire(self, removed: list[Service], drain_timeout: float) -> None:
        """Close the pools of services a reload removed or replaced, once their requests
        (streams and WebSockets included) are done, or after `drain_timeout`. They are in
        `_retired` from the reload on, so a shutdown meanwhile closes them too."""
        await close_later(removed, drain_timeout)
        self._retired = [s for s in self._retired if s not in removed]

    async def close(self) -> None:
        """Shutdown: stop the probes and the draining, close every pool."""
        await self.health.stop()
        await self.discovery.stop()
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for service in [*self.services.values(), *self._retired]:
            await service.close()
        await self.jwks.close()
        await self.rate_limits.close()
        if self.cache is not None:
            await self.cache.close()
        if self.tracer is not None:
            await self.tracer.close()  # the last spans, within a few seconds
        self._retired = []


GATEWAY = web.AppKey("gateway", Gateway)
