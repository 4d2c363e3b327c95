"""The OpenAPI 3.1 document served at /openapi.json, built around the device schema.

OpenAPI 3.1 schema objects are JSON Schema 2020-12, so `components.schemas.Device` *is*
`schemas/device.schema.json` (only its `$schema` member moves up to `jsonSchemaDialect`).
Its `readOnly` members tell readers which fields the server owns, exactly as the service
enforces them. The operations listed here are the routes in `handlers.routes()`; a test keeps
the two in step.
"""

from __future__ import annotations

from typing import Final

from inventory.paging import DEFAULT_LIMIT, MAX_LIMIT
from inventory.schema import DEVICE_SCHEMA, JSON

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
PROBLEM: Final = "application/problem+json"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: JSON, media_type: str = "application/json") -> dict[str, JSON]:
    return {media_type: {"schema": schema}}


def _problem(description: str) -> dict[str, JSON]:
    return {"description": description, "content": _json(_ref("schemas", "Problem"), PROBLEM)}


def _device(description: str, *extra_headers: str) -> dict[str, JSON]:
    headers = {name: _ref("headers", name) for name in ("ETag", *extra_headers)}
    return {
        "description": description,
        "headers": headers,
        "content": _json(_ref("schemas", "Device")),
    }


_ERRORS: Final = {
    "400": _problem("Malformed JSON or a bad query parameter"),
    "404": _problem("No device with this id"),
    "412": _problem("If-Match does not match the device's current ETag"),
    "415": _problem("The body is not in a supported JSON media type"),
    "422": {
        "description": "The body breaks the device schema; `errors` lists every violation",
        "content": _json(_ref("schemas", "ValidationProblem"), PROBLEM),
    },
}


def _errors(*statuses: str) -> dict[str, JSON]:
    return {status: _ERRORS[status] for status in statuses}


def _body(media_types: tuple[str, ...], schema: JSON, description: str) -> dict[str, JSON]:
    content = {media_type: {"schema": schema} for media_type in media_types}
    return {"required": True, "description": description, "content": content}


def _paths() -> dict[str, JSON]:
    device_id = [_ref("parameters", "DeviceId")]
    if_match = [*device_id, _ref("parameters", "IfMatch")]
    device = _ref("schemas", "DeviceInput")
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process is up and its store is open",
                "responses": {
                    "200": {"description": "Alive", "content": _json({"type": "object"})}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": _json({})}},
            }
        },
        "/devices": {
            "get": {
                "operationId": "listDevices",
                "summary": "List devices in creation order, one page at a time",
                "parameters": [_ref("parameters", n) for n in ("Type", "Room", "Limit", "Cursor")],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": _json(_ref("schemas", "DevicePage")),
                    },
                    **_errors("400"),
                },
            },
            "post": {
                "operationId": "createDevice",
                "summary": "Create a device",
                "requestBody": _body(("application/json",), device, "A device without id/dates"),
                "responses": {
                    "201": _device("Created", "Location"),
                    **_errors("400", "415", "422"),
                },
            },
        },
        "/devices/{id}": {
            "get": {
                "operationId": "getDevice",
                "summary": "Read a device",
                "parameters": [*device_id, _ref("parameters", "IfNoneMatch")],
                "responses": {
                    "200": _device("The device"),
                    "304": {"description": "If-None-Match matched: the client's copy is current"},
                    **_errors("404"),
                },
            },
            "put": {
                "operationId": "replaceDevice",
                "summary": "Replace a device (omitted optional members get their defaults)",
                "parameters": if_match,
                "requestBody": _body(("application/json",), device, "A device without id/dates"),
                "responses": {
                    "200": _device("Replaced"),
                    **_errors("400", "404", "412", "415", "422"),
                },
            },
            "patch": {
                "operationId": "patchDevice",
                "summary": "Change a device with a JSON merge patch (RFC 7396)",
                "parameters": if_match,
                "requestBody": _body(
                    ("application/merge-patch+json", "application/json"),
                    {"type": "object"},
                    "A merge patch; `null` removes a member. The result must be a valid device.",
                ),
                "responses": {
                    "200": _device("Patched"),
                    **_errors("400", "404", "412", "415", "422"),
                },
            },
            "delete": {
                "operationId": "deleteDevice",
                "summary": "Delete a device",
                "parameters": if_match,
                "responses": {"204": {"description": "Deleted"}, **_errors("404", "412")},
            },
        },
    }


def _query(name: str, schema: JSON, description: str) -> dict[str, JSON]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _header(name: str, description: str) -> dict[str, JSON]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


def _parameters() -> dict[str, JSON]:
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
    return {
        "DeviceId": {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
        "Type": _query("type", {"enum": list(DEVICE_SCHEMA.device_types)}, "Only this type"),
        "Room": _query("room", {"type": "string"}, "Only devices in this room"),
        "Limit": _query("limit", limit, "Page size"),
        "Cursor": _query("cursor", {"type": "string"}, "`next_cursor` of the previous page"),
        "IfMatch": _header("If-Match", "Write only if the device still has one of these ETags"),
        "IfNoneMatch": _header("If-None-Match", "Answer 304 if the device still has this ETag"),
    }


def _device_input() -> dict[str, JSON]:
    """What a POST or PUT body must be, derived from the device schema like the service does."""
    document = DEVICE_SCHEMA.document
    properties = {
        name: sub
        for name, sub in document["properties"].items()
        if name not in DEVICE_SCHEMA.server_owned
    }
    required = [
        n for n in document["required"] if n in properties and n not in DEVICE_SCHEMA.defaults
    ]
    return {
        "title": "DeviceInput",
        "description": "A device as a client sends it: no server-owned (readOnly) members.",
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


def _schemas() -> dict[str, JSON]:
    device = {key: value for key, value in DEVICE_SCHEMA.document.items() if key != "$schema"}
    problem = {
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "request_id": {"type": "string", "description": "The request's X-Request-ID"},
        },
    }
    field_error = {
        "type": "object",
        "required": ["path", "message"],
        "properties": {
            "path": {"type": "string", "description": "JSON Pointer to the offending member"},
            "message": {"type": "string"},
        },
    }
    return {
        "Device": device,
        "DeviceInput": _device_input(),
        "DevicePage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {
                "items": {"type": "array", "items": _ref("schemas", "Device")},
                "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
            },
        },
        "Problem": problem,
        "FieldError": field_error,
        "ValidationProblem": {
            "allOf": [_ref("schemas", "Problem")],
            "properties": {"errors": {"type": "array", "items": _ref("schemas", "FieldError")}},
        },
    }


def openapi_document(server_url: str = "/") -> dict[str, JSON]:
    """The OpenAPI 3.1 document; `server_url` is where the API is mounted (a gateway prefix)."""
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": DIALECT,
        "info": {
            "title": "Smart-home inventory",
            "version": "1.0.0",
            "description": "Device CRUD. Errors are application/problem+json (RFC 9457).",
        },
        "servers": [{"url": server_url}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(),
            "headers": {
                "ETag": {"description": "Strong entity tag", "schema": {"type": "string"}},
                "Location": {"description": "URL of the new device", "schema": {"type": "string"}},
            },
        },
    }
