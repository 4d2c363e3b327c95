"""The admin listener: health, readiness, metrics, the compiled routes and the loaded config.
It is a separate Application on its own host:port; nothing here is routed publicly.

GET /healthz   200 while the process runs
GET /readyz    200, or 503 with reasons: draining, no table, a service named in
               admin_ready_requires with no usable target (other such services are listed only)
GET /metrics   Prometheus text format (every worker's counters summed with --workers N)
GET /routes    the compiled table: each route's prefix, methods, stages, targets and status
GET /config    the serving file as written (secret values redacted), its version hash, the last
               reload's result (a rejected file's errors with their lines' redacted text)
GET /, /static/..., /stats   the dashboard (gateway/servers/dashboard.py)
POST /cache/purge {"prefix": "/api/..."}   drop cached responses under a path prefix
With admin_auth set, all but /healthz, /readyz and the page's files need the bearer token.

With --workers N, /readyz, /routes and /config tell one story whichever worker accepts the
connection: every worker publishes what it would answer to a shared directory (see
servers/workers.py) and the one that answers merges all of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

from aiohttp import web

from gateway.config.redact import redact
from gateway.http.errors import BadRequest, problem_response
from gateway.http.routing import Route
from gateway.ops.metrics import CONTENT_TYPE
from gateway.runtime.state import GATEWAY, Gateway
from gateway.servers.adminauth import admin_auth
from gateway.servers.dashboard import add_dashboard
from gateway.servers.workers import (
    Snapshots,
    merge_config,
    merge_readyz,
    merge_routes,
    publish_forever,
)
from gateway.upstream.service import Service, Target


@dataclass(slots=True)
class AdminState:
    """What the process tells the admin listener about itself."""

    draining: bool = False  # set on SIGTERM: /readyz answers 503 while requests drain


ADMIN_STATE = web.AppKey("admin_state", AdminState)
SNAPSHOTS = web.AppKey("snapshots", Snapshots)  # set with --workers N: answers are merged


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def unavailable_services(gateway: Gateway) -> dict[str, str]:
    """Each service with no target that may take traffic now, and why not, per target."""
    return {
        name: ", ".join(f"{t.label} {_unavailable(t)}" for t in service.targets)
        for name, service in sorted(gateway.services.items())
        if not service.has_available_target()
    }


def not_ready_reasons(
    gateway: Gateway, state: AdminState, unavailable: dict[str, str]
) -> list[str]:
    """Why this process should not get traffic now; empty when it should. A service down is a
    reason only when the operator said so: one dead backend must not unready every replica."""
    reasons = []
    if state.draining:
        reasons.append("shutting down: draining in-flight requests")
    if not gateway.table.routes:
        reasons.append("no route table loaded")
    for name in gateway.config.admin_ready_requires:
        if name in unavailable:
            reasons.append(f"required service {name!r} has no healthy target ({unavailable[name]})")
    return reasons


def _unavailable(target: Target) -> str:
    return "fails its health check" if not target.healthy else "has its circuit open"


async def readyz(request: web.Request) -> web.Response:
    shared = request.app.get(SNAPSHOTS)
    if shared is not None:
        status, body = merge_readyz(await asyncio.to_thread(shared.read))
        return web.json_response(body, status=status)
    status, body = readyz_answer(request.app[GATEWAY], request.app[ADMIN_STATE])
    return web.json_response(body, status=status)


def readyz_answer(gateway: Gateway, state: AdminState) -> tuple[int, dict[str, object]]:
    """This process's /readyz: (status, body)."""
    unavailable = unavailable_services(gateway)
    reasons = not_ready_reasons(gateway, state, unavailable)
    required = gateway.config.admin_ready_requires
    return 503 if reasons else 200, (
        {
            "ready": not reasons,
            "reasons": reasons,
            "unavailable_services": [
                {"service": name, "required": name in required, "targets": why}
                for name, why in unavailable.items()
            ],
            "version_hash": gateway.config.version_hash,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[GATEWAY].metrics
    if registry.multiprocess:  # reads every worker's files: keep that off the event loop
        registry.flush()  # this worker's latest sums first
        body = await asyncio.to_thread(registry.render_shared) + registry.render_local()
    else:
        body = registry.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def routes(request: web.Request) -> web.Response:
    shared = request.app.get(SNAPSHOTS)
    if shared is not None:
        return web.json_response(merge_routes(await asyncio.to_thread(shared.read)))
    return web.json_response(routes_answer(request.app[GATEWAY]))


def routes_answer(gateway: Gateway) -> dict[str, object]:
    """This process's /routes."""
    table, services = gateway.table, gateway.services  # one consistent snapshot
    warnings = gateway.status.warnings
    out = [_route(route, services.get(route.config.service), warnings) for route in table.routes]
    return {"version_hash": gateway.config.version_hash, "routes": out}


def _route(route: Route, service: Service | None, warnings: list[str]) -> dict[str, object]:
    """One route the way Traefik's API shows it: its settings, status and errors. An
    aggregate or compose route has no one service: "" and no targets."""
    rc = route.config
    mine = [w for w in warnings if f": {rc.name}." in w or f": {rc.name}:" in w]
    return {
        "name": rc.name,
        "prefix": rc.prefix,
        "methods": sorted(rc.methods),
        "service": rc.service,
        "strip_prefix": rc.strip_prefix,
        "stages": list(route.stages),
        "targets": [
            {
                "target": t.label,  # not the URL: it may come from an expanded ${VAR}
                "healthy": t.healthy,
                "circuit": t.breaker.state.name.lower(),
                "in_flight": t.in_flight,
            }
            for t in (service.targets if service is not None else ())
        ],
        "status": "warning" if mine else "ok",
        "errors": mine,
    }


async def config(request: web.Request) -> web.Response:
    shared = request.app.get(SNAPSHOTS)
    if shared is not None:
        return web.json_response(merge_config(await asyncio.to_thread(shared.read)))
    return web.json_response(config_answer(request.app[GATEWAY]))


def config_answer(gateway: Gateway) -> dict[str, object]:
    """This process's /config."""
    status = gateway.status
    return {
        "file": gateway.config.file,
        "version_hash": gateway.config.version_hash,  # of the file being served
        "last_reload": {
            "result": "applied" if status.ok else "rejected",
            "ok": status.ok,
            "at": datetime.fromtimestamp(status.at, UTC).isoformat(timespec="seconds"),
            "version_hash": status.version_hash,  # of the file that was read
            "errors": status.errors,  # FILE:LINE:COL: path: message
            "warnings": status.warnings,
            "error_lines": status.error_lines,  # each error and its line, redacted
        },
        "text": _redacted(gateway.config.text),  # as written: ${VAR} is not expanded here
    }


_redacted = lru_cache(maxsize=4)(redact)  # the text of the few last configs served


def snapshot(gateway: Gateway, state: AdminState) -> dict[str, object]:
    """What this worker publishes for the others to merge (servers/workers.py)."""
    ready_status, ready = readyz_answer(gateway, state)
    return {
        "loaded_at": gateway.status.at,
        "readyz": {"status": ready_status, "body": ready},
        "routes": routes_answer(gateway),
        "config": config_answer(gateway),
    }


def fingerprint(gateway: Gateway, state: AdminState) -> tuple[object, ...]:
    """Changes when something /readyz, /routes or /config shows changes (in flight aside):
    the worker publishes at once then, instead of at its next turn."""
    targets = tuple(
        (t.label, t.healthy, t.breaker.state)
        for service in gateway.services.values()
        for t in service.targets
    )
    return (gateway.status.at, gateway.config.version_hash, state.draining, targets)


async def publish(gateway: Gateway, state: AdminState, shared: Snapshots) -> None:
    """Publish this worker's answers until cancelled (started by gateway/server.py)."""
    await publish_forever(
        shared, lambda: snapshot(gateway, state), lambda: fingerprint(gateway, state)
    )


# -- response cache purge --------------------------------------------------------------------


async def cache_purge(request: web.Request) -> web.Response:
    """Drop every entry of `prefix` and of the paths under it (by segment), on every worker,
    and on every replica sharing store.redis."""
    cache = request.app[GATEWAY].cache
    try:
        data = await request.json()
    except ValueError:
        data = None
    prefix = data.get("prefix") if isinstance(data, dict) else None
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        return problem_response(request, BadRequest('send {"prefix": "/path"}, a path prefix'))
    purged = 0 if cache is None else await cache.invalidator.purge(prefix)
    return web.json_response({"prefix": prefix, "purged": purged})


# -- end of response cache purge --


def create_admin_app(
    gateway: Gateway, state: AdminState | None = None, shared: Snapshots | None = None
) -> web.Application:
    app = web.Application(middlewares=[admin_auth])
    app[GATEWAY] = gateway
    app[ADMIN_STATE] = state if state is not None else AdminState()
    if shared is not None:
        app[SNAPSHOTS] = shared
    gateway.metrics.watch_config(lambda: gateway.status.ok)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes)
    app.router.add_get("/config", config)
    app.router.add_post("/cache/purge", cache_purge)
    # The dashboard: the page, its files and /stats.
    add_dashboard(app)
    return app
