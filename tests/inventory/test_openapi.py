"""/openapi.json: an OpenAPI 3.1 document of exactly the served routes, on the device schema."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for

from inventory.app import create_app
from inventory.openapi import openapi_document
from inventory.schema import DEVICE_SCHEMA_PATH, JSON
from tests.inventory.conftest import HALL_LIGHT, Client, MakeDevice


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
        (method, path) for path, item in openapi_document()["paths"].items() for method in item
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
