"""Prometheus metrics, from prometheus-client. Multiprocess-safe: with --workers N the
supervisor sets PROMETHEUS_MULTIPROC_DIR and /metrics sums every worker's files.

Per request, one `observe()` call does a dict lookup for pre-bound label children and a few
increments; target health and circuit state are read at scrape time by a collector.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
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
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.breaker import Circuit
from gateway.exchange import Exchange
from gateway.upstream import Service

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
disable_created_metrics()  # *_created series double the output and nobody graphs them


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered",
            ["route", "method", "status_class"],
            registry=reg,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer a request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time until upstream response headers",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.bytes_in = Counter(
            "gateway_request_bytes", "Request body bytes", ["route"], registry=reg
        )
        self.bytes_out = Counter(
            "gateway_response_bytes", "Response body bytes", ["route"], registry=reg
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by kind",
            ["service", "kind"],
            registry=reg,
        )
        self.retries = Counter(
            "gateway_upstream_retries", "Retried attempts", ["service"], registry=reg
        )
        self.rate_limited = Counter(
            "gateway_rate_limit_rejections",
            "Requests refused by a rate limit",
            ["route"],
            registry=reg,
        )
        self.reloads = Counter("gateway_config_reloads", "Config reloads", ["result"], registry=reg)
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being handled",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._children: dict[tuple[str, str, int], Callable[[float, int, int], None]] = {}

    def watch(self, services: Callable[[], Iterable[Service]]) -> None:
        """Export target health and circuit state of whatever services are current."""
        self.registry.register(_TargetCollector(services))

    def observe(
        self, ex: Exchange, method: str, status: int, bytes_in: int, bytes_out: int, seconds: float
    ) -> None:
        key = (ex.route, method, status // 100)
        record = self._children.get(key)
        if record is None:
            record = self._children[key] = self._bind(*key)
        record(seconds, bytes_in, bytes_out)
        if ex.service:
            if ex.upstream_ms is not None:
                self.upstream_latency.labels(ex.service).observe(ex.upstream_ms / 1000)
            if ex.retries:
                self.retries.labels(ex.service).inc(ex.retries)
            if ex.upstream_error:
                self.upstream_errors.labels(ex.service, ex.upstream_error).inc()

    def _bind(
        self, route: str, method: str, status_class: int
    ) -> Callable[[float, int, int], None]:
        name = route or "none"
        count = self.requests.labels(name, method, _STATUS_CLASS.get(status_class, "other"))
        latency = self.latency.labels(name)
        bytes_in = self.bytes_in.labels(name)
        bytes_out = self.bytes_out.labels(name)

        def record(seconds: float, sent_in: int, sent_out: int) -> None:
            count.inc()
            latency.observe(seconds)
            if sent_in:
                bytes_in.inc(sent_in)
            if sent_out:
                bytes_out.inc(sent_out)

        return record

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined) + _local_only(self.registry)


def _local_only(registry: CollectorRegistry) -> bytes:
    """In multiprocess mode the file-backed metrics come from the collector; add this
    process's scrape-time gauges (target health, circuit state)."""
    local = CollectorRegistry()
    for collector in list(registry._collector_to_names):
        if isinstance(collector, _TargetCollector):
            local.register(collector)
    return generate_latest(local)


class _TargetCollector(Collector):
    def __init__(self, services: Callable[[], Iterable[Service]]) -> None:
        self.services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily(
            "gateway_target_healthy",
            "1 when the target may take traffic",
            labels=["service", "target"],
        )
        circuit = GaugeMetricFamily(
            "gateway_circuit_state", "0 closed, 1 open, 2 half-open", labels=["service", "target"]
        )
        for service in self.services():
            for target in service.targets:
                labels = [service.name, target.label]
                healthy.add_metric(labels, 1.0 if target.available() else 0.0)
                circuit.add_metric(labels, float(target.breaker.state.value))
        yield healthy
        yield circuit


__all__ = ["CONTENT_TYPE", "Circuit", "Metrics"]
