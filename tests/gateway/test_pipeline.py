"""The pipeline's phases (issue 11): the request phase decides `100 Continue` for every stage
(auth and rate limits too, not only the body limit), a route has exactly one action, and each
upstream call is its own record."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.config.build import load_text
from gateway.config.model import ForwardAction
from tests.gateway.conftest import MakeGateway

KEY = "k-pipeline-0123456789"
GUARDED = f"""
version: 1
auth:
  api_keys:
    - {{consumer: probe, key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}
services:
  sink: {{targets: [$SINK]}}
routes:
  - prefix: /guarded
    service: sink
    auth: {{any_of: [api_key]}}
  - prefix: /limited
    service: sink
    rate_limit: {{limit: 1, per: 1h}}
"""


def counting_sink(bodies: list[int]) -> web.Application:
    async def sink(request: web.Request) -> web.Response:
        bodies.append(len(await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink)
    return app


async def first_line(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout=3)
    finally:
        writer.close()


EXPECTING = b"POST %s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n%s\r\n"


async def test_a_request_auth_refuses_is_answered_401_and_never_invited_to_send_its_body(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    bodies: list[int] = []
    client = await make_gateway(GUARDED, sink=await aiohttp_server(counting_sink(bodies)))
    assert client.port is not None

    refused = await first_line(client.port, EXPECTING % (b"/guarded/x", b""))
    admitted = await first_line(
        client.port, EXPECTING % (b"/guarded/x", b"X-API-Key: " + KEY.encode() + b"\r\n")
    )

    assert refused.startswith(b"HTTP/1.1 401")
    assert admitted == b"HTTP/1.1 100 Continue\r\n"
    assert bodies == []


async def test_a_rate_limited_request_is_refused_before_the_invitation(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    client = await make_gateway(GUARDED, sink=await aiohttp_server(counting_sink([])))
    assert client.port is not None

    first = await first_line(client.port, EXPECTING % (b"/limited/x", b""))
    second = await first_line(client.port, EXPECTING % (b"/limited/x", b""))

    assert first == b"HTTP/1.1 100 Continue\r\n"  # the one token: invited
    assert second.startswith(b"HTTP/1.1 429")


async def test_an_invited_request_runs_its_request_phase_once(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    bodies: list[int] = []
    client = await make_gateway(
        GUARDED.replace("limit: 1, per: 1h", "limit: 1, per: 1h, burst: 1"),
        sink=await aiohttp_server(counting_sink(bodies)),
    )
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(EXPECTING % (b"/limited/x", b""))
        assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        await reader.readline()
        writer.write(b"0123456789")
        status = await asyncio.wait_for(reader.readline(), timeout=3)
    finally:
        writer.close()

    assert status.startswith(b"HTTP/1.1 200")  # not a 429: the one token was taken once
    assert bodies == [10]


@pytest.mark.parametrize(
    ("route", "errors"),
    [
        (
            "  - {prefix: /a, strip_prefix: true}",
            ["r.yaml:5:5: routes.0: a route needs one action: service, aggregate or compose"],
        ),
        (
            "  - {prefix: /a, service: s, compose: {handler: 'shop.orders:place'}}",
            [
                "r.yaml:5:30: routes.0.compose: a route has one action: 'service' and 'compose' cannot both be set",
            ],
        ),
        (
            "  - {prefix: /a, compose: {handler: not-a-name}}",
            [
                "r.yaml:5:37: routes.0.compose.handler: must be package.module:function",
            ],
        ),
    ],
    ids=["no-action", "two-actions", "bad-handler-name"],
)
def test_a_route_has_exactly_one_action(route: str, errors: list[str]) -> None:
    text = f"version: 1\nservices:\n  s: {{targets: ['http://127.0.0.1:9']}}\nroutes:\n{route}\n"

    result = load_text(text, "r.yaml", environ={})

    assert [str(e) for e in result.errors] == errors


def test_a_service_route_compiles_to_a_forward_action() -> None:
    text = "version: 1\nservices:\n  s: {targets: ['http://127.0.0.1:9']}\nroutes:\n  - {prefix: /a, service: s}\n"

    result = load_text(text, "r.yaml", environ={})

    assert result.config is not None
    route = result.config.routes[0]
    assert route.action == ForwardAction("s")
    assert route.service == "s"


FORWARD_AUTHED = """
version: 1
auth:
  forward: {service: accounts, path: /verify}
services:
  accounts: {targets: [$ACCOUNTS]}
  echo: {targets: [$ECHO]}
routes:
  - prefix: /api
    service: echo
    auth: {any_of: [forward]}
"""


async def test_an_auth_sub_request_is_its_own_call_and_leaves_the_forwards_record_alone(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer
) -> None:
    async def admit(request: web.Request) -> web.Response:
        return web.Response(headers={"X-Consumer": "alice"})

    accounts = web.Application()
    accounts.router.add_get("/verify", admit)
    accounts_server: TestServer = await aiohttp_server(accounts)
    client = await make_gateway(FORWARD_AUTHED, accounts=accounts_server)
    gateway = client.server.gateway  # type: ignore[attr-defined]
    seen: list[object] = []
    original = gateway.access_log.record

    def record(*args: object) -> None:  # what the access line is made from
        seen.append(args[1])
        original(*args)

    gateway.access_log.record = record

    resp = await client.get("/api/x", headers={"Authorization": "Bearer t"})
    await resp.read()

    [exchange] = seen
    calls = [(c.service, c.kind, c.target, c.attempts, c.outcome) for c in exchange.calls]  # type: ignore[attr-defined]
    assert calls == [
        ("accounts", "auth", "accounts#0", 1, "ok"),
        ("echo", "forward", "echo#0", 1, "ok"),
    ]
    metrics = gateway.metrics.render().decode()
    assert (
        'gateway_upstream_calls_total{kind="auth",outcome="ok",service="accounts"} 1.0' in metrics
    )
    assert 'gateway_upstream_calls_total{kind="forward",outcome="ok",service="echo"} 1.0' in metrics
    echo_seen = json.loads(
        await (await client.get("/api/y", headers={"Authorization": "Bearer t"})).text()
    )
    assert dict(echo_seen["headers"])["X-Consumer"] == "alice"
