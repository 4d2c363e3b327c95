"""The admin dashboard: the page and its files at /, the /stats summary read from the same
samples as /metrics, optional admin_auth, and no secret value on any admin answer."""

from __future__ import annotations

import hashlib
import math

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.config.redact import REDACTED, redact, redact_lines
from gateway.ops.stats import Snapshot, quantile
from gateway.runtime.state import Gateway
from gateway.servers.admin import create_admin_app
from gateway.servers.dashboard import History
from tests.gateway.conftest import GatewayClient, base_url, compile_gateway
from tests.gateway.test_admin import serve_both
from tests.polling import poll_until
from tests.upstreams import make_echo_app

TWO_ROUTES = """
version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - {prefix: /echo, service: echo}
  - {prefix: /limited, service: echo, rate_limit: {limit: 2, per: 1m}}
"""

PLAIN = """
version: 1
services:
  echo:
    targets: [$ECHO]
    health_check: {path: /healthz, interval: 50ms, timeout: 1s,
                   healthy_threshold: 1, unhealthy_threshold: 1}
routes:
  - {prefix: /echo, service: echo}
"""

API_KEY_HASH = hashlib.sha256(b"the-dev-key").hexdigest()
JWT_SECRET = "s3cr3t-value-from-the-environment-0123456789"
ADMIN_TOKEN = "admin-token-for-tests"
SECRETS_TEXT = f"""
version: 1
auth:
  jwt: {{algorithms: [HS256], secret: "${{JWT_SECRET}}"}}
  api_keys:
    - {{consumer: tools, key_sha256: {API_KEY_HASH}}}
admin_auth: {{token_sha256: {hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}}}
services:
  echo: {{targets: ["${{ECHO_URL}}"]}}
routes:
  - {{prefix: /echo, service: echo, auth: {{any_of: [jwt, api_key]}}}}
"""
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def metric_sum(text: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_the_page_and_its_files_are_served_on_the_admin_listener_only(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    public, admin = await serve_both(aiohttp_client, compile_gateway(PLAIN, echo=echo_upstream))

    page = await admin.get("/")
    script = await admin.get("/static/dashboard.js")
    style = await admin.get("/static/dashboard.css")

    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/static/dashboard.js"' in html
    assert "http://" not in html
    assert "https://" not in html
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert (script.status, script.content_type) == (200, "text/javascript")
    assert (style.status, style.content_type) == (200, "text/css")
    assert (await admin.get("/static/nothing.js")).status == 404
    assert (await admin.get("/static/dashboard.html")).status == 404  # only as /
    assert (await public.get("/")).status == 404
    assert (await public.get("/stats")).status == 404


async def test_stats_counts_the_same_requests_and_buckets_as_metrics(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    public, admin = await serve_both(
        aiohttp_client, compile_gateway(TWO_ROUTES, echo=echo_upstream)
    )
    for _ in range(7):
        assert (await public.get("/echo/x")).status == 200
    statuses = [(await public.get("/limited")).status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]

    stats = await (await admin.get("/stats")).json()
    metrics = await (await admin.get("/metrics")).text()

    echo, limited = stats["routes"]["routes.0"], stats["routes"]["routes.1"]
    assert echo["requests"] == 7 == metric_sum(metrics, "gateway_requests_total", route="routes.0")
    assert limited["requests"] == 4
    assert limited["by_class"] == {"2xx": 2, "4xx": 2}
    assert limited["rate"] > 0  # the page's first poll already has a base: the start
    assert 0 < echo["p50_ms"] <= echo["p99_ms"]
    assert (
        stats["rate_limited"]["routes.1"]["total"]
        == 2
        == metric_sum(metrics, "gateway_rate_limit_rejections_total", route="routes.1")
    )
    assert stats["features"] == {"rate_limit": True, "cache": False}
    assert stats["cache"] == {}
    (target,) = stats["services"]["echo"]["targets"]
    assert target == {
        "target": "echo#0",
        "healthy": True,
        "circuit": "closed",
        "available": True,
        "in_flight": 0,
        "consecutive_failures": 0,
    }


async def test_stats_has_no_rate_limit_panel_when_no_route_limits(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    _, admin = await serve_both(aiohttp_client, compile_gateway(PLAIN, echo=echo_upstream))

    stats = await (await admin.get("/stats")).json()

    assert stats["features"] == {"rate_limit": False, "cache": False}
    assert stats["rate_limited"] == {}


async def test_stats_shows_a_target_turning_unhealthy_and_its_service_errors(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    upstream = await aiohttp_server(make_echo_app())
    public, admin = await serve_both(aiohttp_client, compile_gateway(PLAIN, echo=upstream))
    assert (await public.get("/echo")).status == 200

    await upstream.close()

    async def target() -> dict[str, object]:
        stats = await (await admin.get("/stats")).json()
        found: dict[str, object] = stats["services"]["echo"]["targets"][0]
        return found

    seen = await poll_until(target, lambda t: t["healthy"] is False, within=3.0)
    assert seen["available"] is False
    assert (await public.get("/echo")).status == 503
    stats = await (await admin.get("/stats")).json()
    assert stats["upstream_errors"]["echo"]["total"] == {"no_healthy_target": 1}
    assert stats["routes"]["routes.0"]["errors"] == 1


def test_the_window_base_is_the_newest_snapshot_at_least_a_window_old() -> None:
    history = History(window=10.0, every=1.0)
    for at in (0.0, 0.5, 3.0, 8.0, 11.0, 14.0):
        history.keep(Snapshot(at))

    assert history.base_for(Snapshot(12.0)) is not None
    base = history.base_for(Snapshot(15.0))

    assert base is not None
    assert base.at == 3.0
    assert history.base_for(Snapshot(0.0)) is None


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 0, 0.2: 10, math.inf: 10}, 0.15),  # linear inside (0.1, 0.2]
        (0.5, {0.1: 10, 0.2: 10, math.inf: 10}, 0.05),  # the first bucket starts at 0
        (0.99, {0.1: 50, 0.2: 98, math.inf: 100}, 0.2),  # in +Inf: the highest finite bound
        (0.5, {0.1: 0, math.inf: 0}, None),  # no observations
    ],
)
def test_quantiles_are_estimated_from_buckets_as_prometheus_does(
    q: float, buckets: dict[float, float], expected: float | None
) -> None:
    result = quantile(q, buckets)
    assert result == expected if expected is None else result == pytest.approx(expected)


async def test_with_admin_auth_every_endpoint_but_the_probes_and_the_page_needs_the_token(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    _, admin = await _serve_secrets(aiohttp_client, echo_upstream)

    for path in ("/metrics", "/routes", "/config", "/stats"):
        refused = await admin.get(path)
        assert refused.status == 401, path
        assert refused.content_type == "application/problem+json"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await admin.get(path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status == 401, path
        assert (await admin.get(path, headers=BEARER)).status == 200, path
    for path in ("/healthz", "/readyz", "/", "/static/dashboard.js"):
        assert (await admin.get(path)).status == 200, path


async def test_no_secret_value_appears_on_config_routes_stats_or_the_page(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    _, admin = await _serve_secrets(aiohttp_client, echo_upstream)
    admin_hash = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()

    bodies = {
        path: await (await admin.get(path, headers=BEARER)).text()
        for path in ("/config", "/routes", "/stats", "/metrics", "/", "/static/dashboard.js")
    }

    for path, body in bodies.items():
        for secret in (API_KEY_HASH, JWT_SECRET, admin_hash, ADMIN_TOKEN, base_url(echo_upstream)):
            assert secret not in body, (path, secret)
    config = await (await admin.get("/config", headers=BEARER)).json()
    lines = config["text"].split("\n")
    assert lines == SECRETS_TEXT.replace(API_KEY_HASH, REDACTED).replace(
        admin_hash, REDACTED
    ).replace('"${JWT_SECRET}"', REDACTED).split("\n")  # the same lines, values replaced


async def test_a_rejected_reload_shows_each_error_with_its_redacted_line(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    gateway, admin = await _serve_secrets(aiohttp_client, echo_upstream)
    broken = SECRETS_TEXT.replace('"${JWT_SECRET}"', '"a-literal-secret-in-the-file"').replace(
        "prefix: /echo", "prefix: echo"
    )

    result = load_text(broken, "routes.yaml", environ={"ECHO_URL": base_url(echo_upstream)})
    assert not gateway.apply(result)
    config = await (await admin.get("/config", headers=BEARER)).json()

    body = str(config)
    assert "a-literal-secret-in-the-file" not in body
    assert API_KEY_HASH not in body
    shown = {(e["line"], e["path"]): e for e in config["last_reload"]["error_lines"]}
    assert set(shown) == {(4, "auth.jwt.secret"), (11, "routes.0.prefix")}, shown
    assert (
        shown[4, "auth.jwt.secret"]["text"] == f"  jwt: {{algorithms: [HS256], secret: {REDACTED}}}"
    )
    assert shown[11, "routes.0.prefix"]["text"].startswith("  - {prefix: echo,")
    assert config["last_reload"]["ok"] is False


async def _serve_secrets(
    aiohttp_client: AiohttpClient, upstream: TestServer
) -> tuple[Gateway, GatewayClient]:
    env = {"JWT_SECRET": JWT_SECRET, "ECHO_URL": base_url(upstream)}
    result = load_text(SECRETS_TEXT, "routes.yaml", environ=env)
    assert result.config is not None, [str(e) for e in result.errors]
    gateway = Gateway(result.config)
    return gateway, await aiohttp_client(create_admin_app(gateway))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auth:\n  jwt: {secret: plain}\n", "auth:\n  jwt: {secret: <redacted>}\n"),
        (
            "k:\n  - {key_sha256: 'ab', consumer: x}\n",
            "k:\n  - {key_sha256: <redacted>, consumer: x}\n",
        ),
        ("a:\n  secret: |\n    one\n    two\nb: 1\n", "a:\n  secret: <redacted>\n\n\nb: 1\n"),
        ("x: &s hidden\ny: {secret: *s}\n", "x: <redacted>\ny: {secret: *s}\n"),
        (
            "store: {redis: 'redis://u:pw@h:6379/0'}\n",
            "store: {redis: 'redis://u:<redacted>@h:6379/0'}\n",
        ),
        ("token_sha256: abc\nurl: ${URL}\n", "token_sha256: <redacted>\nurl: ${URL}\n"),
    ],
)
def test_redact_replaces_secret_values_and_keeps_every_line(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_text_that_is_not_yaml_is_redacted_line_by_line() -> None:
    text = 'auth:\n  jwt: {secret: "x",\n  secret: |\n    one\n  key_sha256: ff\nbad: [\n'

    assert redact(text) == redact_lines(text)
    assert redact(text) == (
        "auth:\n  jwt: {secret: <redacted>,\n  secret: <redacted>\n    <redacted>\n"
        "  key_sha256: <redacted>\nbad: [\n"
    )


def test_admin_auth_needs_a_sha256_hex_digest() -> None:
    text = PLAIN.replace("$ECHO", "http://127.0.0.1:1") + "admin_auth: {token_sha256: not-a-hash}\n"

    result = load_text(text, "routes.yaml", environ={})

    assert result.config is None
    assert [e.path for e in result.errors] == ["admin_auth.token_sha256"]
