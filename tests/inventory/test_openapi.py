"""/openapi.json: an OpenAPI 3.1 document of exactly the served routes, on the device schema."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import hdrs
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for

from inventory.app import MAX_BODY_BYTES, create_app
from inventory.openapi import PROBLEM, openapi_document
from inventory.schema import DEVICE_SCHEMA_PATH, JSON
from tests.inventory.conftest import HALL_LIGHT, Client, MakeDevice

OPERATIONS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


async def _document(client: Client, **headers: str) -> dict[str, Any]:
    async with client.get("/openapi.json", headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document: dict[str, Any] = await resp.json()
        return document


def _resolve(document: dict[str, Any], ref: str) -> JSON:
    node: JSON = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(node: JSON) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_the_document_is_openapi_3_1_with_the_device_schema_embedded(client: Client) -> None:
    document = await _document(client)
    on_disk = await asyncio.to_thread(lambda: json.loads(DEVICE_SCHEMA_PATH.read_text()))

    assert document["openapi"] == "3.1.0"
    assert document["jsonSchemaDialect"] == on_disk["$schema"]
    assert document["components"]["schemas"]["Device"] == {
        k: v for k, v in on_disk.items() if k != "$schema"
    }


def test_the_document_describes_exactly_the_routes_the_app_serves(tmp_path: Path) -> None:
    app = create_app(tmp_path / "unused.db")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }

    documented = {
        (method, path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in OPERATIONS
    }

    assert documented == served


async def test_every_reference_in_the_document_resolves(client: Client) -> None:
    document = await _document(client)

    for ref in _refs(document):
        assert _resolve(document, ref) is not None, ref


async def test_the_schemas_are_valid_2020_12_and_describe_what_is_served(
    client: Client, make_device: MakeDevice
) -> None:
    document = await _document(client)
    schemas = document["components"]["schemas"]
    device = await make_device()
    async with client.get("/devices") as resp:
        page = await resp.json()

    assert validator_for(schemas["Device"]) is Draft202012Validator
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    Draft202012Validator(
        schemas["Device"], format_checker=Draft202012Validator.FORMAT_CHECKER
    ).validate(device)
    page_schema = {**schemas["DevicePage"], "$defs": schemas}
    page_schema = json.loads(json.dumps(page_schema).replace("#/components/schemas/", "#/$defs/"))
    Draft202012Validator(page_schema).validate(page)


async def test_the_request_schema_accepts_and_refuses_what_the_service_does(client: Client) -> None:
    schema = (await _document(client))["components"]["schemas"]["DeviceInput"]
    validator = Draft202012Validator(schema)

    assert validator.is_valid(HALL_LIGHT)
    assert validator.is_valid({"name": "a", "type": "plug", "room": "r"})
    assert not validator.is_valid({**HALL_LIGHT, "id": "1"})
    assert not validator.is_valid({**HALL_LIGHT, "colour": "red"})
    assert not validator.is_valid({"name": "a", "type": "plug"})


async def test_the_server_url_follows_a_gateway_prefix(client: Client) -> None:
    assert (await _document(client))["servers"] == [{"url": "/"}]
    document = await _document(client, **{"X-Forwarded-Prefix": "/api/inventory"})
    assert document["servers"] == [{"url": "/api/inventory"}]


def _on_disk_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(DEVICE_SCHEMA_PATH.read_text())
    return schema


async def test_the_patch_schema_is_every_client_writable_member_optional_and_nothing_else(
    client: Client,
) -> None:
    patch = (await _document(client))["components"]["schemas"]["DevicePatch"]
    operation = (await _document(client))["paths"]["/devices/{id}"]["patch"]
    on_disk = await asyncio.to_thread(_on_disk_schema)
    writable = {n: s for n, s in on_disk["properties"].items() if not s.get("readOnly")}

    assert patch["type"] == "object"
    assert patch["additionalProperties"] is False
    assert "required" not in patch
    assert set(patch["properties"]) == set(writable) == {"name", "type", "room", "state"}
    for name in ("name", "type", "room"):  # required members: null would remove them
        assert patch["properties"][name] == writable[name]
    state = {k: v for k, v in writable["state"].items() if k != "default"}
    assert patch["properties"]["state"] == {**state, "type": ["object", "null"]}
    for media_type in ("application/merge-patch+json", "application/json"):
        schema = operation["requestBody"]["content"][media_type]["schema"]
        assert schema == {"$ref": "#/components/schemas/DevicePatch"}


PATCHES: list[JSON] = [
    {},
    {"name": "Porch"},
    {"room": "r", "type": "lock"},
    {"state": {"on": None, "level": 3}},
    {"state": None},
    {"name": None},
    {"room": None},
    {"name": ""},
    {"name": "x" * 101},
    {"type": "lamp"},
    {"state": [1]},
    {"id": "1"},
    {"created_at": None},
    {"colour": "red"},
    [1],
    "name",
]


@pytest.mark.parametrize("patch", PATCHES, ids=[json.dumps(p)[:30] for p in PATCHES])
async def test_the_patch_schema_accepts_and_refuses_what_the_service_does(
    client: Client, make_device: MakeDevice, patch: JSON
) -> None:
    schema = (await _document(client))["components"]["schemas"]["DevicePatch"]
    device = await make_device()
    headers = {"Content-Type": "application/merge-patch+json"}

    async with client.patch(
        f"/devices/{device['id']}", data=json.dumps(patch), headers=headers
    ) as resp:
        assert resp.status in (200, 422)

    assert Draft202012Validator(schema).is_valid(patch) == (resp.status == 200)


BIG = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'
# (operation, status) -> a request that gets that error: (method, path, headers, body)
ERROR_REQUESTS: dict[tuple[str, str], tuple[str, str, dict[str, str], bytes | None]] = {
    ("listDevices", "400"): ("GET", "/devices?limit=0", {}, None),
    ("createDevice", "400"): ("POST", "/devices", {}, b"{"),
    ("createDevice", "413"): ("POST", "/devices", {}, BIG),
    ("createDevice", "415"): ("POST", "/devices", {"Content-Type": "text/plain"}, b"{}"),
    ("createDevice", "422"): ("POST", "/devices", {}, b"{}"),
    ("getDevice", "404"): ("GET", "/devices/999", {}, None),
    ("replaceDevice", "400"): ("PUT", "/devices/1", {}, b"{"),
    ("replaceDevice", "404"): ("PUT", "/devices/999", {}, b"{}"),
    ("replaceDevice", "412"): ("PUT", "/devices/1", {"If-None-Match": "*"}, b"{}"),
    ("replaceDevice", "413"): ("PUT", "/devices/1", {}, BIG),
    ("replaceDevice", "415"): ("PUT", "/devices/1", {"Content-Type": "text/plain"}, b"{}"),
    ("replaceDevice", "422"): ("PUT", "/devices/1", {}, b"{}"),
    ("patchDevice", "400"): ("PATCH", "/devices/1", {}, b"{"),
    ("patchDevice", "404"): ("PATCH", "/devices/999", {}, b"{}"),
    ("patchDevice", "412"): ("PATCH", "/devices/1", {"If-Match": '"stale"'}, b"{}"),
    ("patchDevice", "413"): ("PATCH", "/devices/1", {}, BIG),
    ("patchDevice", "415"): ("PATCH", "/devices/1", {"Content-Type": "text/plain"}, b"{}"),
    ("patchDevice", "422"): ("PATCH", "/devices/1", {}, b'{"name": ""}'),
    ("deleteDevice", "404"): ("DELETE", "/devices/999", {}, None),
    ("deleteDevice", "412"): ("DELETE", "/devices/1", {"If-None-Match": "*"}, None),
}


def _operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        operation["operationId"]: operation
        for item in document["paths"].values()
        for method, operation in item.items()
        if method in OPERATIONS
    }


async def test_each_operation_lists_exactly_the_error_statuses_it_answers(
    client: Client, make_device: MakeDevice
) -> None:
    document = await _document(client)
    await make_device()

    documented = {
        (operation_id, status)
        for operation_id, operation in _operations(document).items()
        for status in operation["responses"]
        if status.startswith("4")
    }
    assert documented == set(ERROR_REQUESTS)
    for (operation_id, status), (method, path, headers, body) in ERROR_REQUESTS.items():
        sent = {"Content-Type": "application/json", **headers} if body is not None else headers
        data = None if body is None else io.BytesIO(body)
        async with client.request(method, path, data=data, headers=sent) as resp:
            assert (resp.status, resp.content_type) == (int(status), PROBLEM), operation_id
            response = _operations(document)[operation_id]["responses"][status]
            assert list(response["content"]) == [PROBLEM]
            for name in response.get("headers", {}):
                assert name in resp.headers, (operation_id, status, name)


async def test_every_other_method_is_a_405_whose_allow_names_the_documented_methods(
    client: Client,
) -> None:
    document = await _document(client)
    not_allowed = document["components"]["responses"]["MethodNotAllowed"]
    assert not_allowed["headers"] == {"Allow": {"$ref": "#/components/headers/Allow"}}

    for path, item in document["paths"].items():
        listed = {method.upper() for method in item if method in OPERATIONS}
        assert "405" in item["description"]
        url = path.replace("{id}", "1")
        for method in {m.upper() for m in OPERATIONS} - listed - {"HEAD", "OPTIONS", "TRACE"}:
            async with client.request(method, url) as resp:
                assert resp.status == 405, (method, path)
                assert resp.content_type == PROBLEM
                allowed = set(resp.headers[hdrs.ALLOW].split(","))
                assert allowed - {"HEAD"} == listed
