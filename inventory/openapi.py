"""The OpenAPI 3.1 document served at /openapi.json, built around the device schema.

OpenAPI 3.1 schema objects are JSON Schema 2020-12, so `components.schemas.Device` *is*
`schemas/device.schema.json` (only its `$schema` member moves up to `jsonSchemaDialect`).
Its `readOnly` members tell readers which fields the server owns, exactly as the service
enforces them; `DeviceInput` (POST, PUT) and `DevicePatch` (PATCH) are derived from it the way
the service derives its checks. The operations listed here are the routes in
`handlers.routes()`, and each lists the error statuses it can really answer; tests keep both
in step with the app.
"""

from __future__ import annotations

from typing import Final

from inventory.paging import DEFAULT_LIMIT, MAX_LIMIT
from inventory.schema import DEVICE_SCHEMA, JSON, MAX_BODY_BYTES, MAX_DEPTH

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
    "400": _problem("Malformed JSON (also not UTF-8, or a BOM) or a bad query parameter"),
    "404": _problem("No device with this id"),
    "412": _problem(
        "If-Match does not match the device's current ETag, or If-None-Match does (`*`: any)"
    ),
    "413": _problem(f"The body is over {MAX_BODY_BYTES} bytes"),
    "415": _problem("The body is not in a supported JSON media type"),
    "422": {
        "description": (
            "The body breaks the device schema, holds a value JSON cannot carry back (a number"
            f" beyond a 64-bit float, a lone surrogate) or nests deeper than {MAX_DEPTH} levels;"
            " `errors` lists every violation"
        ),
        "content": _json(_ref("schemas", "ValidationProblem"), PROBLEM),
    },
}
_PATCH_415: Final = {
    **_ERRORS["415"],
    "headers": {"Accept-Patch": _ref("headers", "AcceptPatch")},
}
_NOT_ALLOWED: Final = "Any other method answers 405 with `Allow` (MethodNotAllowed)."


def _errors(*statuses: str) -> dict[str, JSON]:
    return {status: _ERRORS[status] for status in statuses}


def _body(media_types: tuple[str, ...], schema: JSON, description: str) -> dict[str, JSON]:
    content = {media_type: {"schema": schema} for media_type in media_types}
    return {"required": True, "description": description, "content": content}


def _paths() -> dict[str, JSON]:
    device_id = [_ref("parameters", "DeviceId")]
    preconditions = [*device_id, _ref("parameters", "IfMatch"), _ref("parameters", "IfNoneWrite")]
    device = _ref("schemas", "DeviceInput")
    return {
        "/healthz": {
            "description": _NOT_ALLOWED,
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process is up and its store is open",
                "responses": {
                    "200": {"description": "Alive", "content": _json({"type": "object"})}
                },
            },
        },
        "/openapi.json": {
            "description": _NOT_ALLOWED,
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": _json({})}},
            },
        },
        "/devices": {
            "description": _NOT_ALLOWED,
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
                    **_errors("400", "413", "415", "422"),
                },
            },
        },
        "/devices/{id}": {
            "description": _NOT_ALLOWED,
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
                "parameters": preconditions,
                "requestBody": _body(("application/json",), device, "A device without id/dates"),
                "responses": {
                    "200": _device("Replaced"),
                    **_errors("400", "404", "412", "413", "415", "422"),
                },
            },
            "patch": {
                "operationId": "patchDevice",
                "summary": "Change a device with a JSON merge patch (RFC 7396)",
                "parameters": preconditions,
                "requestBody": _body(
                    ("application/merge-patch+json", "application/json"),
                    _ref("schemas", "DevicePatch"),
                    "A merge patch; `null` removes a member. The result must be a valid device.",
                ),
                "responses": {
                    "200": _device("Patched"),
                    **_errors("400", "404", "412", "413"),
                    "415": _PATCH_415,
                    **_errors("422"),
                },
            },
            "delete": {
                "operationId": "deleteDevice",
                "summary": "Delete a device",
                "parameters": preconditions,
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
        "IfNoneWrite": _header(
            "If-None-Match", "`*`, or ETags: answer 412 instead of writing if the device has one"
        ),
    }


def _client_properties() -> dict[str, JSON]:
    """The device schema's properties a client may write: all but the readOnly ones."""
    return {
        name: sub
        for name, sub in DEVICE_SCHEMA.document["properties"].items()
        if name not in DEVICE_SCHEMA.server_owned
    }


def _device_input() -> dict[str, JSON]:
    """What a POST or PUT body must be, derived from the device schema like the service does."""
    properties = _client_properties()
    required = [
        n
        for n in DEVICE_SCHEMA.document["required"]
        if n in properties and n not in DEVICE_SCHEMA.defaults
    ]
    return {
        "title": "DeviceInput",
        "description": "A device as a client sends it: no server-owned (readOnly) members.",
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


def _nullable(schema: dict[str, JSON]) -> dict[str, JSON]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _device_patch() -> dict[str, JSON]:
    """What a PATCH body may be (RFC 7396), derived from the device schema like `_device_input`.

    Every client-writable member is optional; no other member is allowed. `null` removes a
    member, so it is allowed only where the device survives the removal: a member with a
    default (it returns to the default) or one that is not required.
    """
    required = set(_device_input()["required"])
    properties: dict[str, JSON] = {}
    for name, sub in _client_properties().items():
        member = {key: value for key, value in sub.items() if key != "default"}
        properties[name] = member if name in required else _nullable(member)
    return {
        "title": "DevicePatch",
        "description": (
            "A JSON merge patch of a device's client-writable members, all optional. Objects"
            " merge member by member; `null` removes a member (`state` then returns to `{}`)."
        ),
        "type": "object",
        "additionalProperties": False,
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
        "DevicePatch": _device_patch(),
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
                "Allow": {"description": "The methods the path has", "schema": {"type": "string"}},
                "AcceptPatch": {
                    "description": "The media types PATCH accepts",
                    "schema": {"type": "string"},
                },
            },
            "responses": {
                "MethodNotAllowed": {
                    **_problem("The path has no such method (any path, any method not listed)"),
                    "headers": {"Allow": _ref("headers", "Allow")},
                },
            },
        },
    }
