"""Prometheus metrics, from prometheus-client. Multiprocess-safe: with --workers N the supervisor
sets PROMETHEUS_MULTIPROC_DIR and /metrics sums every worker's files.

Per request, `observe()` adds to plain per-label sums and lists (no lock); `flush()` hands
them to prometheus-client before every scrape and once a second, with the counts of log lines
dropped (`accesslog.drops`). Target health, circuit state and the last reload's verdict are read at
scrape time by collectors of this process (in multiprocess mode: of the worker that was
scraped). Label values are bounded: routes are `routes.N` or
`none`, methods outside the known set are `OTHER`, statuses are classes.
"""

from __future__ import annotations

import asyncio
import collections
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.config.model import ALL_METHODS
from gateway.http.exchange import Exchange, UpstreamCall
from gateway.ops.accesslog import STREAMS, drops
from gateway.upstream.breaker import Circuit
from gateway.upstream.service import Service

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_STATUS_CLASS: Final = {i: f"{i}xx" for i in range(1, 6)}
_KNOWN_METHODS: Final = ALL_METHODS | {"CONNECT", "TRACE"}
_CACHE_RESULTS: Final = {"HIT": "hit", "MISS": "miss", "BYPASS": "bypass", "STALE": "stale"}
# *_created series double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # not annotated upstream


def multiprocess_mode() -> bool:
    """prometheus-client picks file-backed values at import, from PROMETHEUS_MULTIPROC_DIR;
    ask it rather than the environment, which may have changed since."""
    return values.ValueClass is not values.MutexValue


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route (routes.N or none), method and status class",
            ["route", "method", "status_class"],
            registry=reg,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer a request, from its headers to the last byte sent",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time until upstream response headers, retries included",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.bytes_in = Counter(
            "gateway_request_bytes", "Request body bytes received", ["route"], registry=reg
        )
        self.bytes_out = Counter(
            "gateway_response_bytes", "Response body bytes sent", ["route"], registry=reg
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by kind (unavailable, timeout, no_healthy_target, aborted)",
            ["service", "kind"],
            registry=reg,
        )
        self.upstream_calls = Counter(
            "gateway_upstream_calls",
            "Calls to services by service, kind (forward, websocket, auth, part, call) and "
            "outcome (ok once a response head came, else the failure)",
            ["service", "kind", "outcome"],
            registry=reg,
        )
        self.retries = Counter(
            "gateway_upstream_retries", "Retried attempts", ["service"], registry=reg
        )
        self.rate_limited = Counter(
            "gateway_rate_limit_rejections",
            "Requests refused by a rate limit (the gateway's own 429s)",
            ["route"],
            registry=reg,
        )
        self.rate_limit_store_errors = Counter(
            "gateway_rate_limit_store_errors",
            "Rate-limit checks the shared store did not answer in time (on_store_error decided)",
            registry=reg,
        )
        self.cache = Counter(
            "gateway_cache_lookups",
            "Cache lookups on routes that cache, by result (hit, miss, bypass, stale)",
            ["route", "result"],
            registry=reg,
        )
        # -- response cache storage (gateway/cache/store.py), read at flush --
        self.cache_evictions = Counter(
            "gateway_cache_evictions", "Entries the cache evicted to stay in bounds", registry=reg
        )
        self.cache_stored_bytes = Gauge(
            "gateway_cache_stored_bytes",
            "Bytes of entries the cache holds in memory (summed over workers)",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._cache_source: Callable[[], tuple[int, int]] | None = None
        self._evictions_seen = 0
        # -- end of response cache storage --
        self.client_closed = Counter(
            "gateway_client_connections_closed",
            "Client connections the gateway closed on a limit (header_timeout, send_timeout, "
            "over_limit: past max_client_connections)",
            ["reason"],
            registry=reg,
        )
        self.reloads = Counter(
            "gateway_config_reloads", "Config reloads by result", ["result"], registry=reg
        )
        for result in ("applied", "rejected"):  # both series exist from the start, at 0
            self.reloads.labels(result)
        self.log_drops = Counter(
            "gateway_log_lines_dropped",
            "Log lines dropped because their writer fell behind, by stream (access, event)",
            ["stream"],
            registry=reg,
        )
        self._drops_seen = {stream: 0 for stream in STREAMS}  # accesslog.drops moved so far
        for stream in STREAMS:
            self.log_drops.labels(stream)
        self.trace_drops = Counter(
            "gateway_trace_spans_dropped",
            "Spans dropped because the export queue was full (the collector down or slow)",
            registry=reg,
        )
        self.spans_dropped = 0  # by the tracer since the last flush (on the event loop)
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being handled",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.active = 0  # requests in flight in this process, exported at flush
        self._pending: dict[tuple[str, str, int], _Stats] = {}
        self._calls: dict[tuple[str, str, str], int] = {}  # (service, kind, outcome): count
        self._lookups: dict[tuple[str, str], int] = {}  # (route, cache result): count
        self._local: list[Collector] = []  # scrape-time collectors of this process
        self._config_watched = False

    def watch(self, services: Callable[[], Iterable[Service]]) -> None:
        """Export target health and circuit state of whatever services are current."""
        self._add_local(_TargetCollector(services))

    def watch_config(self, last_reload_ok: Callable[[], bool]) -> None:
        """Export whether the last load or reload was accepted (once per Metrics)."""
        if not self._config_watched:
            self._config_watched = True
            self._add_local(_ConfigCollector(last_reload_ok))

    def watch_cache(self, source: Callable[[], tuple[int, int]]) -> None:
        """Export the cache's (stored bytes, evictions so far) at every flush."""
        self._cache_source = source

    def _add_local(self, collector: Collector) -> None:
        self.registry.register(collector)
        self._local.append(collector)

    def observe(
        self, ex: Exchange, method: str, status: int, bytes_in: int, bytes_out: int, seconds: float
    ) -> None:
        """Count one answered request. Plain arithmetic on the event loop (inlined: it runs
        once a request); `flush()` moves the sums into prometheus-client (and its
        multiprocess files) before each scrape and once a second, so no lock is taken per
        request."""
        key = (ex.route, method if method in _KNOWN_METHODS else "OTHER", status // 100)
        stats = self._pending.get(key)
        if stats is None:
            stats = self._pending[key] = _Stats(ex.service)
        stats.seconds.append(seconds)  # counted, summed and bucketed at flush
        if bytes_in:
            stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        calls = ex.calls
        if not calls:
            pass
        elif len(calls) == 1 and calls[0].attempts == 1 and calls[0].outcome == "ok":
            call = calls[0]  # a forward that went well: what most requests are
            if call.ms is not None:  # the main call: the route's service
                stats.upstream.append(call.ms)
            labels = (call.service, call.kind, "ok")
            self._calls[labels] = self._calls.get(labels, 0) + 1
        else:
            self._observe_calls(stats, calls)
        if ex.cache and ex.cache in _CACHE_RESULTS:
            lookup = (ex.route or "none", _CACHE_RESULTS[ex.cache])
            self._lookups[lookup] = self._lookups.get(lookup, 0) + 1
        if status == 429 and not ex.from_upstream:  # only the rate-limit stage answers 429
            self.rate_limited.labels(ex.route or "none").inc()

    def _observe_calls(self, stats: _Stats, calls: tuple[UpstreamCall, ...]) -> None:
        """`observe` for the upstream calls of a request with retries, failures or more than
        one call (auth sub-requests, aggregate parts)."""
        upstream = calls[0].ms  # the main call: the route's service
        if upstream is not None:
            stats.upstream.append(upstream)
        for call in calls:  # every upstream call: the forward, auth sub-requests, parts
            labels = (call.service, call.kind, call.outcome or "unknown")
            self._calls[labels] = self._calls.get(labels, 0) + 1
            if call.attempts > 1:
                self.retries.labels(call.service).inc(call.attempts - 1)
            if call.outcome in _UPSTREAM_FAULTS:
                self.upstream_errors.labels(call.service, call.outcome).inc()

    def flush(self) -> None:
        """Move what `observe()` summed into the prometheus-client metrics."""
        pending, self._pending = self._pending, {}
        calls, self._calls = self._calls, {}
        for labels, count in calls.items():
            self.upstream_calls.labels(*labels).inc(count)
        lookups, self._lookups = self._lookups, {}
        for lookup, count in lookups.items():
            self.cache.labels(*lookup).inc(count)
        for (route, method, status_class), stats in pending.items():
            name = route or "none"
            klass = _STATUS_CLASS.get(status_class, "other")
            self.requests.labels(name, method, klass).inc(len(stats.seconds))
            _add_buckets(self.latency.labels(name), stats.seconds)
            if stats.bytes_in:
                self.bytes_in.labels(name).inc(stats.bytes_in)
            if stats.bytes_out:
                self.bytes_out.labels(name).inc(stats.bytes_out)
            if stats.upstream:  # milliseconds
                child = self.upstream_latency.labels(stats.service)
                _add_buckets(child, [ms / 1000 for ms in stats.upstream])
        if self.spans_dropped:
            self.trace_drops.inc(self.spans_dropped)
            self.spans_dropped = 0
        self.in_flight.set(self.active)
        if self._cache_source is not None:
            stored, evictions = self._cache_source()
            self.cache_stored_bytes.set(stored)
            if evictions > self._evictions_seen:
                self.cache_evictions.inc(evictions - self._evictions_seen)
                self._evictions_seen = evictions
        for stream, seen in self._drops_seen.items():
            if (total := drops.total(stream)) > seen:
                self.log_drops.labels(stream).inc(total - seen)
                self._drops_seen[stream] = total

    async def flush_forever(self, interval: float = 1.0) -> None:
        """Keep the shared (multiprocess) values at most `interval` seconds behind."""
        while True:
            await asyncio.sleep(interval)
            self.flush()

    def render(self) -> bytes:
        """The Prometheus text exposition. In multiprocess mode this reads every worker's
        files, so call it off the event loop (see `render_shared` and `render_local`)."""
        self.flush()
        if not self.multiprocess:
            return generate_latest(self.registry)
        return self.render_shared() + self.render_local()

    def render_shared(self) -> bytes:
        """Multiprocess mode: the file-backed metrics of every worker, summed (blocking I/O)."""
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # not annotated upstream
        return generate_latest(combined)

    def render_local(self) -> bytes:
        """Multiprocess mode: the scrape-time gauges of this worker, which have no files."""
        local = CollectorRegistry()
        for collector in self._local:
            local.register(collector)
        return generate_latest(local)


_BOUNDS: Final = (*LATENCY_BUCKETS, math.inf)


# Call outcomes that are the upstream's failure (a cancelled call or a body the gateway cut
# off are not).
_UPSTREAM_FAULTS: Final = frozenset(
    {"timeout", "unavailable", "no_healthy_target", "pool_exhausted", "aborted", "error"}
)


class _Stats:
    """What one (route, method, status class) saw between two flushes: each request's
    seconds (appended: counted, summed and put in buckets at flush, in C-level passes), body
    bytes, and the upstream milliseconds of its service (a route has one service)."""

    __slots__ = ("bytes_in", "bytes_out", "seconds", "service", "upstream")

    def __init__(self, service: str) -> None:
        self.service = service
        self.seconds: list[float] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream: list[float] = []


def _add_buckets(child: Histogram, observed: list[float]) -> None:
    """Add many observations at once. prometheus-client has only `observe(one)`, so this
    reaches for the per-bucket values it keeps (`_buckets`, `_sum`; the same objects back the
    multiprocess files); tests/gateway/test_metrics.py checks the result through the parser."""
    # Each observation in the first bucket whose `le` is at least it.
    counts = collections.Counter(map(partial(bisect_left, _BOUNDS), observed))
    buckets = child._buckets
    for index, count in counts.items():
        buckets[index].inc(count)
    child._sum.inc(math.fsum(observed))


class _TargetCollector(Collector):
    def __init__(self, services: Callable[[], Iterable[Service]]) -> None:
        self.services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily(
            "gateway_target_healthy",
            "1 when the target may take traffic (health check up, circuit not open)",
            labels=["service", "target"],
        )
        circuit = GaugeMetricFamily(
            "gateway_circuit_state", "0 closed, 1 open, 2 half-open", labels=["service", "target"]
        )
        for service in list(self.services()):
            for target in service.targets:
                labels = [service.name, target.label]
                healthy.add_metric(labels, 1.0 if target.available() else 0.0)
                circuit.add_metric(labels, float(target.breaker.state.value))
        yield healthy
        yield circuit


class _ConfigCollector(Collector):
    def __init__(self, last_reload_ok: Callable[[], bool]) -> None:
        self.last_reload_ok = last_reload_ok

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_config_last_reload_successful",
            "1 when the last load or reload of the config file was accepted, 0 when rejected",
            value=1.0 if self.last_reload_ok() else 0.0,
        )


__all__ = ["CONTENT_TYPE", "Circuit", "Metrics", "multiprocess_mode"]
