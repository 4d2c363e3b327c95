"""The admin listener: health, readiness, metrics, the compiled routes and the loaded config.
It is a separate Application on its own host:port; nothing here is routed publicly.

GET /healthz   200 while the process runs
GET /readyz    200, or 503 with reasons: draining, no table, a service named in
               admin_ready_requires with no usable target (other such services are listed only)
GET /metrics   Prometheus text format (every worker's counters summed with --workers N)
GET /routes    the compiled table: each route's prefix, methods, stages, targets and status
GET /config    the serving file as written, its version hash, the last reload's result
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from gateway.http.routing import Route
from gateway.ops.metrics import CONTENT_TYPE
from gateway.runtime.state import GATEWAY, Gateway
from gateway.upstream.service import Service, Target


@dataclass(slots=True)
class AdminState:
    """What the process tells the admin listener about itself."""

    draining: bool = False  # set on SIGTERM: /readyz answers 503 while requests drain


ADMIN_STATE = web.AppKey("admin_state", AdminState)


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
    gateway = request.app[GATEWAY]
    unavailable = unavailable_services(gateway)
    reasons = not_ready_reasons(gateway, request.app[ADMIN_STATE], unavailable)
    required = gateway.config.admin_ready_requires
    return web.json_response(
        {
            "ready": not reasons,
            "reasons": reasons,
            "unavailable_services": [
                {"service": name, "required": name in required, "targets": why}
                for name, why in unavailable.items()
            ],
            "version_hash": gateway.config.version_hash,
        },
        status=503 if reasons else 200,
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
    gateway = request.app[GATEWAY]
    table, services = gateway.table, gateway.services  # one consistent snapshot
    warnings = gateway.status.warnings
    out = [_route(route, services.get(route.config.service), warnings) for route in table.routes]
    return web.json_response({"version_hash": gateway.config.version_hash, "routes": out})


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
            }
            for t in (service.targets if service is not None else ())
        ],
        "status": "warning" if mine else "ok",
        "errors": mine,
    }


async def config(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    status = gateway.status
    return web.json_response(
        {
            "file": gateway.config.file,
            "version_hash": gateway.config.version_hash,  # of the file being served
            "last_reload": {
                "result": "applied" if status.ok else "rejected",
                "ok": status.ok,
                "at": datetime.fromtimestamp(status.at, UTC).isoformat(timespec="seconds"),
                "version_hash": status.version_hash,  # of the file that was read
                "errors": status.errors,  # FILE:LINE:COL: path: message
                "warnings": status.warnings,
            },
            "text": gateway.config.text,  # as written: ${VAR} values are not expanded here
        }
    )


def create_admin_app(gateway: Gateway, state: AdminState | None = None) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app[ADMIN_STATE] = state if state is not None else AdminState()
    gateway.metrics.watch_config(lambda: gateway.status.ok)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes)
    app.router.add_get("/config", config)
    return app
