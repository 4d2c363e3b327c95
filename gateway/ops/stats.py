"""The dashboard's figures, read from the same prometheus-client samples /metrics prints.

`snapshot()` keeps the cumulative values a summary needs from a scrape's metric families
(`Registry.collect()`, or the merged multiprocess collector with --workers N): requests by
route and status class, latency buckets by route, rate-limit refusals, cache lookups,
upstream errors by service and kind, and requests in flight. `summarize(now, base)` turns two
snapshots into rates, error ratios and p50/p99 over the time between them. Nothing here counts
on its own, so the dashboard and Prometheus never disagree: the page shows what `rate()` and
`histogram_quantile()` over the same series would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.metrics_core import Metric

QUANTILES: Final = {"p50_ms": 0.5, "p99_ms": 0.99}
_ERROR_CLASS: Final = "5xx"  # what the error ratio counts: the gateway's or upstream's faults


@dataclass(slots=True)
class Snapshot:
    """Cumulative values at `at` (seconds, any monotonic-enough clock shared by the two)."""

    at: float
    requests: dict[str, dict[str, float]] = field(default_factory=dict)  # route: class: n
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # route: le: n (cum.)
    rate_limited: dict[str, float] = field(default_factory=dict)  # route: refusals
    cache: dict[str, dict[str, float]] = field(default_factory=dict)  # route: hit|miss: n
    upstream_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # service: kind
    in_flight: float = 0.0


def snapshot(families: Iterable[Metric], at: float) -> Snapshot:
    """The dashboard's cumulative values out of one scrape."""
    snap = Snapshot(at)
    for family in families:
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            match sample.name:
                case "gateway_requests_total":
                    by_class = snap.requests.setdefault(labels["route"], {})
                    klass = labels["status_class"]
                    by_class[klass] = by_class.get(klass, 0.0) + value  # summed over methods
                case "gateway_request_duration_seconds_bucket":
                    le = float(labels["le"])
                    snap.buckets.setdefault(labels["route"], {})[le] = value
                case "gateway_rate_limit_rejections_total":
                    snap.rate_limited[labels["route"]] = value
                case "gateway_cache_lookups_total":
                    snap.cache.setdefault(labels["route"], {})[labels["result"]] = value
                case "gateway_upstream_errors_total":
                    snap.upstream_errors.setdefault(labels["service"], {})[labels["kind"]] = value
                case "gateway_requests_in_flight":
                    snap.in_flight += value
    return snap


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' `histogram_quantile`: linear inside the bucket that holds rank q·count; a
    rank in the +Inf bucket is the highest finite bound. None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return le if inside <= 0 else lower + (le - lower) * (rank - below) / inside
        lower, below = le, count
    return lower


def _delta(now: dict[str, float], base: dict[str, float] | None) -> dict[str, float]:
    """Counter increase; a counter that went down was reset (a new process): its value is all."""
    base = base or {}
    out = {}
    for key, value in now.items():
        before = base.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


def _delta_buckets(now: dict[float, float], base: dict[float, float] | None) -> dict[float, float]:
    base = base or {}
    if any(now[le] < base.get(le, 0.0) for le in now):
        return dict(now)
    return {le: value - base.get(le, 0.0) for le, value in now.items()}


def summarize(now: Snapshot, base: Snapshot | None) -> dict[str, object]:
    """Per route: totals, and over [base.at, now.at] the request rate, error ratio and p50/p99
    (None where there is no base yet or nothing happened). Rate-limit and cache figures only
    for the routes that have any."""
    seconds = now.at - base.at if base is not None else 0.0
    routes: dict[str, dict[str, object]] = {}
    for route in sorted(now.requests.keys() | now.buckets.keys()):
        by_class = now.requests.get(route, {})
        total = sum(by_class.values())
        entry: dict[str, object] = {
            "requests": total,
            "errors": by_class.get(_ERROR_CLASS, 0.0),
            "by_class": dict(sorted(by_class.items())),
            "rate": None,
            "error_ratio": None,
            **dict.fromkeys(QUANTILES),
        }
        if base is not None and seconds > 0:
            window = _delta(by_class, base.requests.get(route))
            count = sum(window.values())
            entry["rate"] = round(count / seconds, 3)
            if count:
                entry["error_ratio"] = round(window.get(_ERROR_CLASS, 0.0) / count, 4)
            buckets = _delta_buckets(now.buckets.get(route, {}), base.buckets.get(route))
            for name, q in QUANTILES.items():
                value = quantile(q, buckets)
                entry[name] = None if value is None else round(value * 1000, 2)
        routes[route] = entry
    return {
        "window_seconds": round(seconds, 3) if base is not None else None,
        "in_flight": now.in_flight,
        "routes": routes,
        "rate_limited": _windowed(
            now.rate_limited, base.rate_limited if base is not None else None, seconds
        ),
        "cache": {
            route: _cache(counts, base.cache.get(route) if base is not None else None)
            for route, counts in sorted(now.cache.items())
        },
        "upstream_errors": {
            service: {
                "total": dict(sorted(kinds.items())),
                "recent": _delta(kinds, base.upstream_errors.get(service) if base else None)
                if base is not None
                else None,
            }
            for service, kinds in sorted(now.upstream_errors.items())
        },
    }


def _windowed(
    now: dict[str, float], base: dict[str, float] | None, seconds: float
) -> dict[str, dict[str, float | None]]:
    """Each key's total and its increase per second over the window."""
    window = _delta(now, base) if base is not None else {}
    return {
        key: {
            "total": value,
            "rate": round(window[key] / seconds, 3) if key in window and seconds > 0 else None,
        }
        for key, value in sorted(now.items())
    }


def _cache(now: dict[str, float], base: dict[str, float] | None) -> dict[str, float | None]:
    hits, misses = now.get("hit", 0.0), now.get("miss", 0.0)
    window = _delta(now, base) if base is not None else {}
    recent = window.get("hit", 0.0) + window.get("miss", 0.0)
    return {
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "recent_hit_ratio": round(window.get("hit", 0.0) / recent, 4) if recent else None,
    }
