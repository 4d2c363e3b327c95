"""`gateway explain`: the route, upstream URL and stages a request would get, or its 404/405."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import main

ROUTES = """\
version: 1
limits: {max_body_bytes: 1000}
services:
  inventory: {targets: ["http://10.0.0.5:8001/base"]}
routes:
  - prefix: /api/inventory
    service: inventory
    strip_prefix: true
    methods: [GET, POST]
    request_headers: {set: {X-Gateway: "true"}}
"""


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    return path


def test_explain_names_route_upstream_url_and_stages(
    routes_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["explain", "--config", str(routes_file), "get", "/api/x/../inventory/devices?a=%2F"]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "route:    routes.0 (prefix /api/inventory" in out
    assert "upstream: http://10.0.0.5:8001/base/devices?a=%2F" in out
    assert "stages:   body_limit > headers > forward" in out


def test_explain_shows_the_405_with_allow(
    routes_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["explain", "--config", str(routes_file), "DELETE", "/api/inventory/devices/1"])

    assert "-> 405 Method Not Allowed" in capsys.readouterr().out


def test_explain_shows_the_404(routes_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["explain", "--config", str(routes_file), "GET", "/api/inventoryx"])

    assert "-> 404 Not Found" in capsys.readouterr().out


def test_explain_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.replace("strip_prefix", "strip"))

    code = main(["explain", "--config", str(path), "GET", "/"])

    assert code == 1
    assert "routes.0.strip: unknown key 'strip'" in capsys.readouterr().err


def test_explain_lists_an_aggregates_parts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        ROUTES
        + "  - prefix: /home\n    aggregate:\n"
        + "      all: {service: inventory, path: /devices}\n"
        + "      one: {service: inventory, path: '/devices/{rest}', required: false}\n"
    )

    code = main(["explain", "--config", str(path), "GET", "/home/7"])

    out = capsys.readouterr().out
    assert code == 0
    assert "  part:     all: GET inventory /devices\n" in out
    assert "  part:     one: GET inventory /devices/{rest} (optional)\n" in out
    assert "  stages:   body_limit > aggregate" in out
