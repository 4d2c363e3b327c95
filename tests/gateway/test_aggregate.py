"""The aggregate action (CONTRACT §11) against real upstreams: concurrency, optional and
required failures, the part body rules, safe templates, identity headers, and auth and rate
limits applied once to the client's request."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.config.build import load_text
from gateway.ops.accesslog import access_logger
from tests.compose_upstreams import SEEN, make_parts_app
from tests.gateway.conftest import MakeGateway
from tests.gateway.test_accesslog import Lines
from tests.polling import free_port

KEY = "aggregate-test-key"
HEAD = f"""
version: 1
auth:
  api_keys:
    - {{consumer: tester, key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}
services:
  a: {{targets: [$PARTS]}}
  b: {{targets: [$PARTS]}}
  dead: {{targets: ["http://127.0.0.1:{free_port()}"]}}
routes:
"""


@pytest.fixture
async def parts(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_parts_app())


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    lines = Lines()
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(lines)
    try:
        yield lines
    finally:
        access_logger.removeHandler(lines)


async def test_parts_run_concurrently_so_the_answer_takes_about_the_slowest_part(
    make_gateway: MakeGateway, parts: TestServer
) -> None:
    client = await make_gateway(
        HEAD
        + """  - prefix: /home
    aggregate:
      one: {service: a, path: "/json/one?ms=500"}
      two: {service: b, path: "/json/two?ms=500"}
      three: {service: a, path: "/json/three?ms=500"}
""",
        parts=parts,
    )
    started = time.monotonic()
    resp = await client.get("/home")
    body = await resp.json()
    took = time.monotonic() - started

    assert resp.status == 200
    assert [body[n]["name"] for n in ("one", "two", "three")] == ["one", "two", "three"]
    assert body["partial"] == []
    assert "X-Partial" not in resp.headers
    assert 0.5 <= took < 1.2  # one slow part's time, not the sum (1.5 s)


async def test_an_optional_part_that_fails_is_null_and_listed_in_partial(
    make_gateway: MakeGateway, parts: TestServer
) -> None:
    client = await make_gateway(
        HEAD
        + """  - prefix: /home
    aggregate:
      ok: {service: a, path: /json/ok}
      gone: {service: dead, path: /json/gone, required: false}
      broken: {service: b, path: /status/500, required: false}
""",
        parts=parts,
    )
    resp = await client.get("/home")
    body = await resp.json()

    assert resp.status == 200
    assert body["ok"]["name"] == "ok"
    assert body["gone"] is None
    assert body["broken"] is None
    assert body["partial"] == ["gone", "broken"]
    assert resp.headers["X-Partial"] == "gone, broken"


@pytest.mark.parametrize(
    ("part", "status", "detail"),
    [
        ("{service: dead, path: /json/x}", 502, "part 'main': service 'dead' failed"),
        ("{service: a, path: /status/503}", 502, "part 'main': service 'a' answered 503"),
        ("{service: a, path: /html}", 502, "part 'main': service 'a' did not answer JSON"),
        ("{service: a, path: /big}", 502, "larger than this route's max_part_bytes"),
        ("{service: a, path: '/json/x?ms=3000', timeout: 200ms}", 504, "did not answer in time"),
    ],
    ids=["unreachable", "5xx", "not-json", "too-big", "timeout"],
)
async def test_a_required_part_that_fails_is_a_problem_naming_the_part_never_its_address(
    make_gateway: MakeGateway, parts: TestServer, part: str, status: int, detail: str
) -> None:
    client = await make_gateway(
        HEAD
        + f"""  - prefix: /home
    aggregate:
      fine: {{service: b, path: /json/fine}}
      main: {part}
""",
        parts=parts,
    )
    started = time.monotonic()
    resp = await client.get("/home")
    text = await resp.text()

    assert resp.status == status
    assert resp.content_type == "application/problem+json"
    assert detail in (await resp.json())["detail"]
    assert "127.0.0.1" not in text
    assert str(parts.port) not in text
    assert time.monotonic() - started < 2  # a timed-out part ends the answer at its timeout


async def test_the_route_deadline_bounds_every_part(
    make_gateway: MakeGateway, parts: TestServer
) -> None:
    client = await make_gateway(
        HEAD
        + """  - prefix: /home
    timeouts: {total: 300ms}
    aggregate:
      slow: {service: a, path: "/json/slow?ms=3000", required: false}
      quick: {service: b, path: /json/quick}
""",
        parts=parts,
    )
    started = time.monotonic()
    resp = await client.get("/home")
    body = await resp.json()

    assert resp.status == 200
    assert body["partial"] == ["slow"]
    assert time.monotonic() - started < 1.5


async def test_templates_take_the_rest_of_the_path_and_query_values_safely(
    make_gateway: MakeGateway, parts: TestServer
) -> None:
    client = await make_gateway(
        HEAD
        + """  - prefix: /home
    aggregate:
      device: {service: a, path: "/json/device/{rest}?room={query.room}&x=1"}
""",
        parts=parts,
    )
    resp = await client.get("/home/7/state", params={"room": "hall/../x?y=1&z=2#f"})
    seen = (await resp.json())["device"]["path_qs"]

    assert resp.status == 200
    assert seen == "/json/device/7/state?room=hall%2F..%2Fx%3Fy%3D1%26z%3D2%23f&x=1"
    assert parts.app[SEEN][-1][1] == seen  # one path, and the one query parameter it had


async def test_every_part_carries_the_identity_headers_and_the_request_id_and_no_client_body(
    make_gateway: MakeGateway, parts: TestServer, access_lines: Lines
) -> None:
    client = await make_gateway(
        HEAD
        + """  - prefix: /home
    methods: [GET, POST]
    auth: {any_of: [api_key]}
    request_headers: {set: {X-Gateway: "yes"}}
    aggregate:
      one: {service: a, path: /json/one}
      two: {service: b, path: /json/two}
""",
        parts=parts,
    )
    resp = await client.post(
        "/home",
        data=b'{"secret": 1}',
        headers={"X-API-Key": KEY, "X-Request-ID": "req-7", "Content-Type": "application/json"},
    )
    body = await resp.json()
    lines = await access_lines.wait_for(1)

    assert resp.status == 200
    for name in ("one", "two"):
        headers = body[name]["headers"]
        assert headers["X-Request-ID"] == "req-7"
        assert headers["X-Consumer"] == "tester"
        assert headers["X-Gateway"] == "yes"
        assert headers["X-Forwarded-For"] == "127.0.0.1"
        assert "traceparent" in headers
        assert "Content-Type" not in headers
        assert body[name]["method"] == "GET"
        assert body[name]["body"] == ""
    calls = lines[0]["calls"]
    assert isinstance(calls, list)
    assert [(c["service"], c["kind"], c["outcome"]) for c in calls] == [
        ("a", "part", "ok"),
        ("b", "part", "ok"),
    ]


async def test_auth_and_rate_limit_apply_once_to_the_clients_request(
    make_gateway: MakeGateway, parts: TestServer
) -> None:
    client = await make_gateway(
        HEAD
        + """  - prefix: /home
    auth: {any_of: [api_key]}
    rate_limit: {limit: 1, per: 1m, key: consumer}
    aggregate:
      one: {service: a, path: /json/one}
      two: {service: a, path: /json/two}
      three: {service: b, path: /json/three}
""",
        parts=parts,
    )
    refused = await client.get("/home")
    first = await client.get("/home", headers={"X-API-Key": KEY})
    second = await client.get("/home", headers={"X-API-Key": KEY})

    assert refused.status == 401
    assert first.status == 200  # three parts, one token
    assert second.status == 429
    assert len(parts.app[SEEN]) == 3  # the refused requests reached no part


@pytest.mark.parametrize(
    ("parts_yaml", "errors"),
    [
        (
            "{x: {service: nope, path: /a}}",
            ["r.yaml:6:30: routes.0.aggregate.x.service: unknown service 'nope'"],
        ),
        (
            "{x: {service: s, path: '/a/{who}'}}",
            [
                "r.yaml:6:39: routes.0.aggregate.x.path: unknown placeholder {who}: use {rest} or {query.NAME}"
            ],
        ),
        (
            "{partial: {service: s, path: /a}}",
            [
                "r.yaml:6:17: routes.0.aggregate.partial: 'partial' names the answer's list of failed parts"
            ],
        ),
    ],
    ids=["unknown-service", "unknown-placeholder", "reserved-name"],
)
def test_bad_aggregate_config_is_reported_at_file_line_col(
    parts_yaml: str, errors: list[str]
) -> None:
    text = (
        "version: 1\nservices:\n  s: {targets: ['http://127.0.0.1:9']}\nroutes:\n"
        f"  - prefix: /a\n    aggregate: {parts_yaml}\n"
    )
    result = load_text(text, "r.yaml", environ={})

    assert [str(e) for e in result.errors] == errors
