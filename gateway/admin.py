"""The admin listener: health, readiness, metrics, the compiled routes and the loaded config.
It is a separate Application on its own host:port; nothing here is routed publicly."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from gateway.app import GATEWAY, Gateway
from gateway.metrics import CONTENT_TYPE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    reasons = [
        f"service {name!r} has no healthy target"
        for name, service in gateway.services.items()
        if not service.has_available_target()
    ]
    if not gateway.table.routes:
        reasons.append("no route table loaded")
    status = 503 if reasons else 200
    return web.json_response({"ready": not reasons, "reasons": reasons}, status=status)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def routes(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    warnings = gateway.status.warnings
    out = []
    for route in gateway.table.routes:
        rc = route.config
        mine = [w for w in warnings if f": {rc.name}." in w or f": {rc.name}:" in w]
        service = gateway.services[rc.service]
        out.append(
            {
                "name": rc.name,
                "prefix": rc.prefix,
                "methods": sorted(rc.methods),
                "service": rc.service,
                "strip_prefix": rc.strip_prefix,
                "stages": list(route.stages),
                "targets": [
                    {
                        "target": t.label,
                        "healthy": t.healthy,
                        "circuit": t.breaker.state.name.lower(),
                    }
                    for t in service.targets
                ],
                "status": "warning" if mine else "ok",
                "errors": mine,
            }
        )
    return web.json_response({"version_hash": gateway.config.version_hash, "routes": out})


async def config(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    status = gateway.status
    return web.json_response(
        {
            "file": gateway.config.file,
            "version_hash": gateway.config.version_hash,
            "last_reload": {
                "ok": status.ok,
                "at": datetime.fromtimestamp(status.at, UTC).isoformat(timespec="seconds"),
                "version_hash": status.version_hash,
                "errors": status.errors,
                "warnings": status.warnings,
            },
            "text": gateway.config.text,  # as written: ${VAR} values are not expanded here
        }
    )


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes)
    app.router.add_get("/config", config)
    return app
