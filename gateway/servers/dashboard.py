"""The admin dashboard: one page at `/` with its script and style under `/static/`, and the
`/stats` summary it polls (with `/routes`, `/config` and `/readyz`).

GET /               the page (gateway/servers/static/dashboard.html: no build step, no CDN)
GET /static/NAME    its script and style, read once at import and served from memory
GET /stats          per route: requests, rate, error ratio, p50/p99 over the last ~10 s;
                    per service: each target's health, circuit, in-flight count, consecutive
                    failures, and upstream errors by kind; rate-limit refusals; cache lookups

The figures come from the prometheus-client samples /metrics prints (gateway/ops/stats.py), so
they cover every worker with --workers N. Rates are the increase since a snapshot about
`WINDOW_SECONDS` old, kept by the worker that answers; target health, circuits and in-flight
counts are that worker's view (every worker probes its targets itself).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import Metric

from gateway.ops.metrics import Metrics
from gateway.ops.stats import Snapshot, snapshot, summarize
from gateway.runtime.state import GATEWAY, Gateway

STATIC_DIR: Final = Path(__file__).parent / "static"
WINDOW_SECONDS: Final = 10.0  # rates and quantiles are over about this long
KEEP_EVERY: Final = 1.0  # seconds between the snapshots kept for the window
_TYPES: Final = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # The page loads only its own files and talks only to this listener.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every static file by name, with its content type (read at import: off the loop)."""
    return {
        path.name: (path.read_bytes(), _TYPES[path.suffix])
        for path in sorted(STATIC_DIR.iterdir())
        if path.suffix in _TYPES
    }


ASSETS: Final = _load_assets()


class History:
    """Snapshots of the last `WINDOW_SECONDS` and one older: the base of the next summary."""

    def __init__(self, window: float = WINDOW_SECONDS, every: float = KEEP_EVERY) -> None:
        self.window = window
        self.every = every
        self._kept: deque[Snapshot] = deque()

    def base_for(self, now: Snapshot) -> Snapshot | None:
        """The newest snapshot at least `window` old, else the oldest one before `now`."""
        older = [s for s in self._kept if s.at < now.at]
        if not older:
            return None
        ripe = [s for s in older if s.at <= now.at - self.window]
        return ripe[-1] if ripe else older[0]

    def keep(self, now: Snapshot) -> None:
        if not self._kept or now.at - self._kept[-1].at >= self.every:
            self._kept.append(now)
        while len(self._kept) > 1 and self._kept[1].at <= now.at - self.window:
            self._kept.popleft()


HISTORY: Final = web.AppKey("dashboard_history", History)


def _merged() -> list[Metric]:
    """Every worker's file-backed samples, summed as /metrics sums them (blocking I/O)."""
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # not annotated upstream
    return list(combined.collect())


async def read_snapshot(metrics: Metrics) -> Snapshot:
    metrics.flush()  # this worker's latest sums first, as before a scrape
    if metrics.multiprocess:
        families = await asyncio.to_thread(_merged)
    else:
        families = list(metrics.registry.collect())
    return snapshot(families, time.monotonic())


async def index(request: web.Request) -> web.Response:
    return _asset("dashboard.html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS or name == "dashboard.html":
        raise web.HTTPNotFound()
    return _asset(name)


def _asset(name: str) -> web.Response:
    body, content_type = ASSETS[name]
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)


async def stats(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    history = request.app[HISTORY]
    now = await read_snapshot(gateway.metrics)
    summary = summarize(now, history.base_for(now))
    history.keep(now)
    summary["services"] = services_view(gateway)
    summary["features"] = features(gateway, now)
    summary["version_hash"] = gateway.config.version_hash
    summary["time"] = time.time()
    return web.json_response(summary, headers={"Cache-Control": "no-store"})


def services_view(gateway: Gateway) -> dict[str, object]:
    """Each service's targets as this worker sees them: labels, never addresses."""
    return {
        name: {
            "targets": [
                {
                    "target": t.label,
                    "healthy": t.healthy,
                    "circuit": t.breaker.state.name.lower(),
                    "available": t.available(),
                    "in_flight": t.in_flight,
                    "consecutive_failures": t.breaker.consecutive_failures,
                }
                for t in service.targets
            ],
            "health_checked": service.config.health_check is not None,
        }
        for name, service in sorted(gateway.services.items())
    }


def features(gateway: Gateway, now: Snapshot) -> dict[str, bool]:
    """Which optional panels the page shows: a feature some route uses, or has figures for."""
    stages = {stage for route in gateway.table.routes for stage in route.stages}
    return {
        "rate_limit": "rate_limit" in stages or bool(now.rate_limited),
        "cache": "cache" in stages or bool(now.cache),
    }


async def _seed(app: web.Application) -> None:
    """A first snapshot at start, so the first /stats already has rates."""
    app[HISTORY].keep(await read_snapshot(app[GATEWAY].metrics))


def add_dashboard(app: web.Application) -> None:
    """The page, its files and /stats, on the admin app."""
    app[HISTORY] = History()
    app.on_startup.append(_seed)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/stats", stats)
