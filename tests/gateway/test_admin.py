"""The admin listener: /healthz, /readyz, /metrics, /routes and /config, on its own app and
never through the public one."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.runtime.state import Gateway
from gateway.servers.admin import AdminState, create_admin_app
from gateway.servers.public import create_app
from tests.gateway.conftest import GatewayClient, base_url, compile_gateway
from tests.polling import poll_until
from tests.upstreams import make_echo_app

ADMIN_PATHS = ["/healthz", "/readyz", "/metrics", "/routes", "/config"]

ECHO_ROUTES = """
version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - {prefix: /api/inventory, service: echo, strip_prefix: true}
  - {prefix: /echo, service: echo}
"""

HEALTH_CHECKED = """
version: 1
services:
  echo:
    targets: [$ECHO]
    health_check: {path: /healthz, interval: 50ms, timeout: 1s,
                   healthy_threshold: 1, unhealthy_threshold: 1}
routes:
  - {prefix: /echo, service: echo}
"""


async def serve_both(
    aiohttp_client: AiohttpClient, gateway: Gateway, state: AdminState | None = None
) -> tuple[GatewayClient, GatewayClient]:
    """The public app (which runs the gateway's lifecycle) and the admin app, both served."""
    public = await aiohttp_client(create_app(gateway))
    admin = await aiohttp_client(create_admin_app(gateway, state))
    return public, admin


async def readiness(admin: GatewayClient, status: int, within: float = 2.0) -> dict[str, object]:
    """Poll /readyz until it answers `status` or the deadline passes; return its body."""
    deadline = time.monotonic() + within
    while True:
        resp = await admin.get("/readyz")
        body: dict[str, object] = await resp.json()
        if resp.status == status or time.monotonic() > deadline:
            assert resp.status == status, body
            return body
        await asyncio.sleep(0.02)


async def test_healthz_answers_200_while_the_process_runs(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    _, admin = await serve_both(aiohttp_client, compile_gateway(ECHO_ROUTES, echo=echo_upstream))

    resp = await admin.get("/healthz")

    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_is_200_without_reasons_when_every_service_has_a_target(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    gateway = compile_gateway(HEALTH_CHECKED, echo=echo_upstream)
    _, admin = await serve_both(aiohttp_client, gateway)

    body = await readiness(admin, 200)

    assert body == {
        "ready": True,
        "reasons": [],
        "unavailable_services": [],
        "version_hash": gateway.config.version_hash,
    }


async def readyz_body(admin: GatewayClient) -> tuple[int, dict[str, object]]:
    resp = await admin.get("/readyz")
    body: dict[str, object] = await resp.json()
    return resp.status, body


async def test_a_service_with_no_healthy_target_is_listed_but_readyz_stays_200(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    upstream = await aiohttp_server(make_echo_app())
    _, admin = await serve_both(aiohttp_client, compile_gateway(HEALTH_CHECKED, echo=upstream))
    await readiness(admin, 200)

    await upstream.close()
    status, body = await poll_until(
        lambda: readyz_body(admin), lambda r: r[1]["unavailable_services"] != [], within=2.0
    )

    assert status == 200
    assert (body["ready"], body["reasons"]) == (True, [])
    assert body["unavailable_services"] == [
        {"service": "echo", "required": False, "targets": "echo#0 fails its health check"}
    ]


async def test_a_required_service_flips_readyz_to_503_and_back_when_it_returns(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    upstream = await aiohttp_server(make_echo_app())
    port = upstream.port
    routes = HEALTH_CHECKED.replace("version: 1", "version: 1\nadmin_ready_requires: [echo]")
    _, admin = await serve_both(aiohttp_client, compile_gateway(routes, echo=upstream))
    await readiness(admin, 200)

    await upstream.close()
    down = await readiness(admin, 503)
    await aiohttp_server(make_echo_app(), port=port)
    up = await readiness(admin, 200)

    assert down["ready"] is False
    assert down["reasons"] == [
        "required service 'echo' has no healthy target (echo#0 fails its health check)"
    ]
    assert down["unavailable_services"] == [
        {"service": "echo", "required": True, "targets": "echo#0 fails its health check"}
    ]
    assert (up["reasons"], up["unavailable_services"]) == ([], [])


async def test_readyz_is_503_while_the_process_drains(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    gateway = compile_gateway(ECHO_ROUTES, echo=echo_upstream)
    _, admin = await serve_both(aiohttp_client, gateway, AdminState(draining=True))

    resp = await admin.get("/readyz")

    assert resp.status == 503
    assert (await resp.json())["reasons"] == ["shutting down: draining in-flight requests"]


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_paths_are_404_on_the_public_listener(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer, path: str
) -> None:
    public, _ = await serve_both(aiohttp_client, compile_gateway(ECHO_ROUTES, echo=echo_upstream))

    resp = await public.get(path)

    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["title"] == "Not Found"


async def test_metrics_answers_prometheus_text_that_the_parser_reads(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    public, admin = await serve_both(
        aiohttp_client, compile_gateway(ECHO_ROUTES, echo=echo_upstream)
    )
    assert (await public.get("/echo/x")).status == 200

    resp = await admin.get("/metrics")
    text = await resp.text()

    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "gateway_requests",
        "gateway_request_duration_seconds",
        "gateway_upstream_duration_seconds",
        "gateway_requests_in_flight",
        "gateway_config_reloads",
        "gateway_config_last_reload_successful",
        "gateway_target_healthy",
        "gateway_circuit_state",
    } <= names


async def test_routes_lists_each_route_with_its_stages_targets_and_status(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    gateway = compile_gateway(ECHO_ROUTES, echo=echo_upstream)
    _, admin = await serve_both(aiohttp_client, gateway)

    body = await (await admin.get("/routes")).json()

    assert body["version_hash"] == gateway.config.version_hash
    assert [r["prefix"] for r in body["routes"]] == ["/api/inventory", "/echo"]
    first = body["routes"][0]
    assert first["name"] == "routes.0"
    assert first["service"] == "echo"
    assert first["strip_prefix"] is True
    assert first["stages"][-1] == "forward"
    assert first["targets"] == [
        {"target": "echo#0", "healthy": True, "circuit": "closed", "in_flight": 0}
    ]
    assert (first["status"], first["errors"]) == ("ok", [])


async def test_routes_lists_an_aggregate_route_without_a_service(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    routes = ECHO_ROUTES + "  - prefix: /home\n    aggregate: {a: {service: echo, path: /a}}\n"
    _, admin = await serve_both(aiohttp_client, compile_gateway(routes, echo=echo_upstream))

    body = await (await admin.get("/routes")).json()

    home = body["routes"][-1]
    assert (home["prefix"], home["service"], home["targets"]) == ("/home", "", [])
    assert home["stages"][-1] == "aggregate"


async def test_config_shows_the_file_as_written_its_hash_and_no_expanded_secret(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    text = f"""
version: 1
services:
  echo: {{targets: ["{base_url(echo_upstream)}"]}}
routes:
  - prefix: /echo
    service: echo
    request_headers: {{set: {{X-Api-Key: "${{UPSTREAM_KEY}}"}}}}
"""
    result = load_text(text, "routes.yaml", environ={"UPSTREAM_KEY": "s3cr3t-value"})
    assert result.config is not None
    public, admin = await serve_both(aiohttp_client, Gateway(result.config))
    assert (await public.get("/echo/x")).status == 200

    resp = await admin.get("/config")
    body = await resp.json()

    assert body["file"] == "routes.yaml"
    assert body["version_hash"] == hashlib.sha256(text.encode()).hexdigest()
    assert body["text"] == text
    assert body["last_reload"]["result"] == "applied"
    assert body["last_reload"]["errors"] == []
    for path in ADMIN_PATHS:
        assert "s3cr3t-value" not in await (await admin.get(path)).text()


async def test_the_admin_app_has_no_public_routes(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    _, admin = await serve_both(aiohttp_client, compile_gateway(ECHO_ROUTES, echo=echo_upstream))

    resp = await admin.get("/echo/x")

    assert resp.status == 404


async def test_admin_app_serves_head_for_probes(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    _, admin = await serve_both(aiohttp_client, compile_gateway(ECHO_ROUTES, echo=echo_upstream))

    resp = await admin.head("/healthz")

    assert resp.status == 200
