"""Matching: dot-segment removal, longest whole-segment prefix, 404 and 405 with Allow."""

from __future__ import annotations

import pytest
from yarl import URL

from gateway.http.errors import BadRequest
from gateway.http.routing import normalize_path, split_target, strip
from tests.gateway.conftest import MakeGateway

ROUTES = """
version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - {prefix: /api/inventory, service: echo, strip_prefix: true, methods: [GET, POST]}
  - {prefix: /api, service: echo, methods: [GET]}
  - {prefix: /public, service: echo}
"""


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2e/%2e/c/", "/c/"),
        ("/..", "/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a//b", "/a/b"),
        ("/a/%2f/b", "/a/%2F/b"),
        ("/a/%7euser", "/a/~user"),
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
    ],
)
def test_paths_are_normalized_before_matching(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


def test_a_target_that_is_not_a_path_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        normalize_path("*")


def test_query_is_split_off_byte_for_byte() -> None:
    assert split_target("/a?x=%2F&y") == ("/a", "?x=%2F&y")
    assert split_target("/a") == ("/a", "")


def test_strip_leaves_a_root_path() -> None:
    assert strip("/api/inventory", "/api/inventory") == "/"
    assert strip("/api/inventory", "/api/inventory/devices/7") == "/devices/7"
    assert strip("/", "/x") == "/x"


async def test_longest_prefix_wins_on_whole_segments(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ROUTES)

    inventory = await (await client.get("/api/inventory/devices")).json()
    api = await (await client.get("/api/inventoryx/devices")).json()

    assert inventory["path_qs"] == "/devices"  # stripped: routes.0
    assert api["path_qs"] == "/api/inventoryx/devices"  # /api/inv... never matches /api/inventory


async def test_no_route_is_a_404_problem(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ROUTES)

    resp = await client.get("/nothing/here")
    problem = await resp.json(content_type="application/problem+json")

    assert resp.status == 404
    assert problem["status"] == 404
    assert problem["title"] == "Not Found"
    assert problem["request_id"] == resp.headers["X-Request-ID"]


async def test_wrong_method_is_a_405_with_allow(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ROUTES)

    resp = await client.delete("/api/inventory/devices/1")

    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD, POST"
    assert resp.content_type == "application/problem+json"


async def test_traversal_cannot_leave_the_route_it_names(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ROUTES)
    base = str(client.make_url("/")).rstrip("/")

    plain = await client.session.get(URL(base + "/public/../api/inventory/x", encoded=True))
    encoded = await client.session.get(URL(base + "/public/%2e%2e/api/inventory/x", encoded=True))
    deep = await client.session.get(
        URL(base + "/api/inventory/%2E%2E/%2e%2e/public/y", encoded=True)
    )

    assert (await plain.json())["path_qs"] == "/x"  # routes.0 (what the normalized path names)
    assert (await encoded.json())["path_qs"] == "/x"
    assert (await deep.json())["path_qs"] == "/public/y"  # routes.2, unstripped


async def test_forwarded_path_is_the_normalized_one(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ROUTES)
    base = str(client.make_url("/")).rstrip("/")

    resp = await client.session.get(URL(base + "/public/a/./b//c/%7e?q=%2e%2e", encoded=True))

    assert (await resp.json())["path_qs"] == "/public/a/b/c/~?q=%2e%2e"
