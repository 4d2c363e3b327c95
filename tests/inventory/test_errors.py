"""Problem responses: their shape, request ids, and every error status a client can cause."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import hdrs, web
from pytest_aiohttp import AiohttpClient

from inventory.app import MAX_BODY_BYTES
from inventory.errors import InvalidDevice, problem_middleware
from inventory.schema import FieldError
from tests.inventory.conftest import HALL_LIGHT, Client, MakeDevice

PROBLEM_KEYS = {"type", "title", "status", "detail"}


async def test_a_problem_has_the_rfc_9457_members_and_the_request_id(client: Client) -> None:
    async with client.get("/devices/404", headers={"X-Request-ID": "req-123"}) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
        problem = await resp.json(content_type=None)

    assert problem == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "no device with this id",
        "request_id": "req-123",
    }


@pytest.mark.parametrize("request_id", [None, "", "x" * 201, "bad\tid"])
async def test_a_problem_has_no_request_id_unless_a_sane_one_was_sent(
    client: Client, request_id: str | None
) -> None:
    headers = {} if request_id is None else {"X-Request-ID": request_id}
    async with client.get("/devices/404", headers=headers) as resp:
        assert set(await resp.json(content_type=None)) == PROBLEM_KEYS


async def test_an_unknown_path_is_a_404_problem(client: Client) -> None:
    async with client.get("/nowhere") as resp:
        assert resp.status == 404
        assert (await resp.json(content_type=None))["title"] == "Not Found"


async def test_a_wrong_method_is_a_405_problem_with_allow(client: Client) -> None:
    async with client.post("/healthz") as resp:
        assert resp.status == 405
        assert resp.content_type == "application/problem+json"
        assert set(resp.headers[hdrs.ALLOW].split(",")) == {"GET", "HEAD"}


async def test_a_body_over_a_mebibyte_is_a_413_problem(client: Client) -> None:
    big = io.BytesIO(json.dumps({**HALL_LIGHT, "state": {"blob": "x" * 1024**2}}).encode())
    headers = {hdrs.CONTENT_TYPE: "application/json"}
    async with client.post("/devices", data=big, headers=headers) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/problem+json"


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_a_body_over_the_limit_is_a_413_problem_on_every_write(
    client: Client, make_device: MakeDevice, method: str, framing: str
) -> None:
    device = await make_device()
    url = "/devices" if method == "POST" else f"/devices/{device['id']}"
    body = json.dumps({"name": "x" * MAX_BODY_BYTES}).encode()
    data = io.BytesIO(body) if framing == "content-length" else _chunks(body)

    async with client.request(
        method, url, data=data, headers={hdrs.CONTENT_TYPE: "application/json"}
    ) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/problem+json"
        problem = await resp.json(content_type=None)
    assert (problem["status"], problem["title"]) == (413, "Request Entity Too Large")
    async with client.get(f"/devices/{device['id']}") as resp:
        assert await resp.json() == device


async def test_a_body_of_exactly_the_limit_is_read(client: Client) -> None:
    body = json.dumps({**HALL_LIGHT, "state": {"blob": ""}}).encode()
    body = body.replace(b'"blob": ""', b'"blob": "' + b"x" * (MAX_BODY_BYTES - len(body)) + b'"')
    assert len(body) == MAX_BODY_BYTES
    headers = {hdrs.CONTENT_TYPE: "application/json"}
    async with client.post("/devices", data=io.BytesIO(body), headers=headers) as resp:
        assert resp.status == 201


@pytest.mark.parametrize(
    "body",
    [b"{", b"", b"[1,", b"NaN", b'{"state": {"x": Infinity}}', b"\xff\xfe{", b"{'a': 1}"],
    ids=["open-brace", "empty", "truncated", "nan", "infinity", "not-utf8", "single-quotes"],
)
@pytest.mark.parametrize(("method", "path"), [("POST", "/devices"), ("PUT", "/1"), ("PATCH", "/1")])
async def test_malformed_json_is_a_400_problem(
    client: Client, make_device: MakeDevice, body: bytes, method: str, path: str
) -> None:
    await make_device()
    url = "/devices" if path == "/devices" else f"/devices{path}"
    headers = {hdrs.CONTENT_TYPE: "application/json"}
    async with client.request(method, url, data=body, headers=headers) as resp:
        assert resp.status == 400
        assert "not valid JSON" in (await resp.json(content_type=None))["detail"]


@pytest.mark.parametrize(
    ("method", "content_type"),
    [
        ("POST", None),
        ("POST", "text/plain"),
        ("POST", "application/x-www-form-urlencoded"),
        ("POST", "application/merge-patch+json"),
        ("PUT", "text/json"),
        ("PUT", "application/merge-patch+json"),
        ("PATCH", "application/json-patch+json"),
        ("PATCH", "text/plain"),
    ],
)
async def test_a_non_json_content_type_is_a_415_problem(
    client: Client, make_device: MakeDevice, method: str, content_type: str | None
) -> None:
    device = await make_device()
    url = "/devices" if method == "POST" else f"/devices/{device['id']}"
    headers = {} if content_type is None else {hdrs.CONTENT_TYPE: content_type}
    async with client.request(method, url, data=b'{"name": "x"}', headers=headers) as resp:
        assert resp.status == 415
        assert resp.content_type == "application/problem+json"
        if method == "PATCH":
            assert resp.headers["Accept-Patch"] == "application/merge-patch+json, application/json"


async def test_a_json_content_type_with_a_charset_is_accepted(client: Client) -> None:
    headers = {hdrs.CONTENT_TYPE: "application/json; charset=utf-8"}
    async with client.post(
        "/devices", data=b'{"name":"a","type":"plug","room":"r"}', headers=headers
    ) as resp:
        assert resp.status == 201


async def test_a_422_lists_every_error_with_its_json_pointer(client: Client) -> None:
    body = {"id": "1", "created_at": "now", "name": "", "type": "lamp", "colour": "red"}
    async with client.post("/devices", json=body, headers={"X-Request-ID": "r1"}) as resp:
        assert resp.status == 422
        assert resp.content_type == "application/problem+json"
        problem = await resp.json(content_type=None)

    assert problem["request_id"] == "r1"
    assert problem["detail"] == "the device has 6 errors"
    assert [(e["path"], e["message"][:22]) for e in problem["errors"]] == [
        ("/colour", "unknown field"),
        ("/created_at", "server-owned field: th"),
        ("/id", "server-owned field: th"),
        ("/name", "'' should be non-empty"),
        ("/room", "required field is miss"),
        ("/type", "'lamp' is not one of ["),
    ]


def test_invalid_device_counts_its_errors_in_the_detail() -> None:
    assert InvalidDevice([FieldError("/a", "x")]).detail == "the device has 1 error"


async def test_an_unexpected_exception_is_a_500_problem_without_internals(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(request: web.Request) -> web.Response:
        raise RuntimeError("secret at /srv/inventory.db")

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/boom", explode)
    client = await aiohttp_client(app)

    with caplog.at_level(logging.ERROR, logger="inventory.errors"):
        async with client.get("/boom") as resp:
            assert resp.status == 500
            text = await resp.text()

    assert "secret" not in text
    assert "Traceback" not in text
    assert "secret at /srv/inventory.db" in caplog.text  # logged once, for the operator
