"""CORS per route: preflights answered at the gateway, Vary: Origin on every answer, and no
Access-Control-* header for an origin that is not allowed (not even the upstream's own)."""

from __future__ import annotations

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.config.build import load_text
from tests.gateway.conftest import GatewayClient, MakeGateway
from tests.polling import free_port

APP = "https://app.example"
CORS = """
version: 1
services:
  echo: {targets: [$ECHO]}
  loose: {targets: [$LOOSE]}
  dead: {targets: [$DEAD]}
routes:
  - prefix: /api
    service: echo
    methods: [GET, POST]
    cors:
      origins: [https://app.example, https://admin.example]
      credentials: true
      headers: [Authorization, Content-Type]
      max_age: 10m
  - prefix: /opts
    service: loose
    methods: [GET, OPTIONS]
    cors: {origins: [https://app.example]}
  - prefix: /public
    service: echo
    cors: {origins: ["*"], methods: [GET]}
  - prefix: /down
    service: dead
    cors: {origins: [https://app.example]}
  - prefix: /plain
    service: loose
"""


async def loose(request: web.Request) -> web.Response:
    """An upstream with its own, too generous, CORS headers."""
    return web.Response(
        text="upstream",
        headers={"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "DELETE"},
    )


@pytest.fixture
async def make_cors(make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> MakeGateway:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", loose)
    upstream = await aiohttp_server(app)
    routes = CORS.replace("$DEAD", f"http://127.0.0.1:{free_port()}")

    async def make(text: str = routes) -> GatewayClient:
        return await make_gateway(text, loose=upstream)

    return make


def preflight(origin: str, method: str = "POST", headers: str = "") -> dict[str, str]:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return asked


def access_control(headers: object) -> dict[str, str]:
    assert hasattr(headers, "items")
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


async def test_a_preflight_from_an_allowed_origin_is_answered_204_even_without_options(
    make_cors: MakeGateway,
) -> None:
    client = await make_cors()

    resp = await client.options("/api/devices", headers=preflight(APP, "POST", "content-type"))

    assert resp.status == 204
    assert await resp.read() == b""  # the echo upstream would have answered with JSON
    assert access_control(resp.headers) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, HEAD, POST",
        "Access-Control-Max-Age": "600",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
    }
    assert resp.headers.getall("Vary") == ["Origin"]
    assert "X-Request-ID" in resp.headers


async def test_a_preflight_is_never_forwarded_on_a_route_that_serves_options(
    make_cors: MakeGateway,
) -> None:
    client = await make_cors()

    resp = await client.options("/opts/x", headers=preflight(APP, "GET", "x-trace"))

    assert resp.status == 204
    assert await resp.read() == b""
    assert access_control(resp.headers) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
        "Access-Control-Allow-Headers": "x-trace",  # no headers configured: what was asked
    }


async def test_a_preflight_from_another_origin_gets_no_cors_headers_and_a_405(
    make_cors: MakeGateway,
) -> None:
    client = await make_cors()

    resp = await client.options("/api/devices", headers=preflight("https://evil.example"))

    assert resp.status == 405
    assert access_control(resp.headers) == {}
    assert resp.headers["Vary"] == "Origin"
    assert resp.headers["Allow"] == "GET, HEAD, POST"


async def test_a_preflight_from_another_origin_passes_through_without_the_upstreams_cors(
    make_cors: MakeGateway,
) -> None:
    client = await make_cors()

    resp = await client.options("/opts/x", headers=preflight("https://evil.example"))

    assert resp.status == 200
    assert await resp.text() == "upstream"  # forwarded as a plain OPTIONS
    assert access_control(resp.headers) == {}  # the upstream's "*" is dropped too
    assert resp.headers["Vary"] == "Origin"


async def test_an_allowed_origin_gets_its_origin_and_credentials_on_a_streamed_answer(
    make_cors: MakeGateway,
) -> None:
    client = await make_cors()

    resp = await client.get("/api/devices", headers={"Origin": "https://admin.example"})

    assert resp.status == 200
    assert (await resp.json())["method"] == "GET"
    assert access_control(resp.headers) == {
        "Access-Control-Allow-Origin": "https://admin.example",
        "Access-Control-Allow-Credentials": "true",
    }
    assert resp.headers["Vary"] == "Origin"


async def test_another_origin_and_no_origin_get_only_vary(make_cors: MakeGateway) -> None:
    client = await make_cors()

    other = await client.get("/opts/x", headers={"Origin": "https://evil.example"})
    none = await client.get("/opts/x")

    for resp in (other, none):
        assert resp.status == 200
        assert access_control(resp.headers) == {}
        assert resp.headers["Vary"] == "Origin"


async def test_an_error_answer_of_a_cors_route_carries_the_cors_headers(
    make_cors: MakeGateway,
) -> None:
    client = await make_cors()

    resp = await client.get("/down/x", headers={"Origin": APP})

    assert resp.status == 502
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert resp.headers["Vary"] == "Origin"


async def test_any_origin_gets_a_star_without_credentials(make_cors: MakeGateway) -> None:
    client = await make_cors()

    actual = await client.get("/public", headers={"Origin": "https://anyone.example"})
    asked = await client.options("/public", headers=preflight("https://anyone.example", "GET"))

    assert access_control(actual.headers) == {"Access-Control-Allow-Origin": "*"}
    assert asked.status == 204
    assert access_control(asked.headers) == {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET",
    }


async def test_a_route_without_cors_relays_the_upstreams_headers(make_cors: MakeGateway) -> None:
    client = await make_cors()

    resp = await client.get("/plain", headers={"Origin": APP})

    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Vary" not in resp.headers


HEAD = (
    "version: 1\nservices:\n  s: {targets: [http://h:1]}\nroutes:\n  - prefix: /\n    service: s\n"
)


@pytest.mark.parametrize(
    ("cors", "expected"),
    [
        (
            '    cors: {origins: [https://a.example, "*"], credentials: true}\n',
            "routes.yaml:7:41: routes.0.cors.origins.1: credentials: true needs explicit"
            " origins; '*' is never sent with them",
        ),
        (
            "    cors: {origins: [https://a.example/app]}\n",
            "routes.yaml:7:22: routes.0.cors.origins.0: must be '*' or an origin:"
            " scheme://host[:port], without a path",
        ),
        (
            "    cors: {origins: []}\n",
            "routes.yaml:7:21: routes.0.cors.origins: must have at least 1 item",
        ),
    ],
    ids=["credentials_with_star", "origin_with_a_path", "no_origins"],
)
def test_cors_config_errors_are_reported_at_their_position(cors: str, expected: str) -> None:
    result = load_text(HEAD + cors, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [expected]
