"""One coroutine per row of the inventory API table, plus the route list that wires them.

Handlers parse the request (content type, JSON, query), let the store do the work on its
thread, and shape the response. Every failure is an `InventoryError` that the problem
middleware answers, so no handler builds an error response itself.

Order of checks on a write: 415 (content type), 413 (over the body limit), 400 (not UTF-8 JSON),
then in the store 404, 412 (`If-Match`, then `If-None-Match`, RFC 9110 §13.2.2: preconditions
before the content is processed), 422 (schema, values JSON cannot carry, nesting).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

from aiohttp import hdrs, web

from inventory.errors import InvalidDevice, InvalidQuery, MalformedJson, UnsupportedMediaType
from inventory.openapi import openapi_document
from inventory.paging import decode_cursor, encode_cursor, parse_limit
from inventory.patch import if_none_match_passes, merge_patch, representation, strong_etag
from inventory.schema import DEVICE_SCHEMA, JSON, MAX_DEPTH, value_errors
from inventory.store import Device, DeviceStore, Fields, Filters

STORE: Final = web.AppKey("inventory_store", DeviceStore)

JSON_TYPE: Final = "application/json"
MERGE_PATCH_TYPE: Final = "application/merge-patch+json"
WRITE_TYPES: Final = (JSON_TYPE,)
PATCH_TYPES: Final = (MERGE_PATCH_TYPE, JSON_TYPE)
FORWARDED_PREFIX: Final = "X-Forwarded-Prefix"
# A prefix the gateway stripped; only plain path segments are believed.
_SANE_PREFIX: Final = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")


def _reject_constant(name: str) -> JSON:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: web.Request, accepted: Iterable[str]) -> JSON:
    """The request body as JSON, or 415 for another content type, or 400 for bad JSON.

    The body must be UTF-8 without a byte order mark (RFC 8259 §8.1): UTF-16 and UTF-32,
    which `json.loads` would sniff and accept from bytes, are a 400 like any other bytes that
    are not UTF-8, and so are UTF-8-encoded surrogates (ED A0 80), which it lets through.
    """
    accepted = tuple(accepted)
    if request.content_type not in accepted:
        headers = {"Accept-Patch": ", ".join(accepted)} if request.method == "PATCH" else {}
        raise UnsupportedMediaType(
            f"send the body as {' or '.join(accepted)}, not {request.content_type}",
            headers=headers,
        )
    body = await request.read()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(
            f"the body is not valid JSON: not UTF-8 at byte {exc.start} ({exc.reason})"
        ) from exc
    if text.startswith("\ufeff"):
        raise MalformedJson("the body is not valid JSON: it starts with a byte order mark")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise MalformedJson(
            f"the body cannot be read: nested far deeper than the limit of {MAX_DEPTH} levels"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer too long to read
        raise MalformedJson(f"the body is not valid JSON: {exc}") from exc


def validated(document: JSON, *, patch: JSON = None) -> Fields:
    """`document` as client fields with defaults filled in, or InvalidDevice with every error.

    `patch` is the merge patch that produced `document`, if any: naming a server-owned member
    in it is an error even when the member's value is `null`.
    """
    errors = set(DEVICE_SCHEMA.input_errors(document))
    errors.update(DEVICE_SCHEMA.server_owned_errors(patch))
    if errors:
        raise InvalidDevice(sorted(errors))
    return DEVICE_SCHEMA.with_defaults(document)


def patched(current: Fields, patch: JSON) -> Fields:
    """`patch` merged into the current fields, validated like a PUT body.

    A patch nested too deeply is refused before merging: the merge recurses along it.
    """
    too_deep = value_errors(patch, depth_only=True)
    if too_deep:
        raise InvalidDevice(too_deep)
    return validated(merge_patch(current, patch), patch=patch)


def device_response(
    device: Device, *, status: int = 200, location: str | None = None
) -> web.Response:
    """The device as JSON with its strong ETag (the digest of exactly these bytes)."""
    body = representation(device)
    headers = {hdrs.ETAG: strong_etag(body)}
    if location is not None:
        headers[hdrs.LOCATION] = location
    return web.Response(status=status, body=body, content_type=JSON_TYPE, headers=headers)


def json_response(document: JSON) -> web.Response:
    return web.Response(body=representation(document), content_type=JSON_TYPE)


def forwarded_prefix(request: web.Request) -> str:
    """The path prefix a gateway stripped (`X-Forwarded-Prefix`), if it looks like one."""
    prefix = request.headers.get(FORWARDED_PREFIX, "").rstrip("/")
    return prefix if _SANE_PREFIX.fullmatch(prefix) else ""


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is up and its store is open."""
    return json_response({"status": "ok"})


async def get_openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 description of this table."""
    return json_response(openapi_document(server_url=forwarded_prefix(request) or "/"))


async def list_devices(request: web.Request) -> web.Response:
    """GET /devices?type=&room=&limit=&cursor=: one page, in creation order."""
    query = request.query
    kind = query.get("type")
    if kind is not None and kind not in DEVICE_SCHEMA.device_types:
        allowed = ", ".join(DEVICE_SCHEMA.device_types)
        raise InvalidQuery(f"type must be one of {allowed}, got {kind[:40]!r}")
    limit = parse_limit(query.get("limit"))
    after = decode_cursor(query.get("cursor"))
    page = await request.app[STORE].page(Filters(kind, query.get("room")), after, limit)
    cursor = None if page.next_after is None else encode_cursor(page.next_after)
    return json_response({"items": page.items, "next_cursor": cursor})


async def create_device(request: web.Request) -> web.Response:
    """POST /devices: 201 with Location and ETag."""
    fields = validated(await read_json(request, WRITE_TYPES))
    device = await request.app[STORE].create(fields)
    location = f"{forwarded_prefix(request)}/devices/{device['id']}"
    return device_response(device, status=201, location=location)


async def get_device(request: web.Request) -> web.Response:
    """GET /devices/{id}: 200 with ETag, 304 when If-None-Match already has it, or 404."""
    device = await request.app[STORE].get(request.match_info["id"])
    response = device_response(device)
    if not if_none_match_passes(
        request.headers.get(hdrs.IF_NONE_MATCH), response.headers[hdrs.ETAG]
    ):
        return web.Response(status=304, headers={hdrs.ETAG: response.headers[hdrs.ETAG]})
    return response


async def replace_device(request: web.Request) -> web.Response:
    """PUT /devices/{id}: full replace; omitted optional members return to their defaults."""
    document = await read_json(request, WRITE_TYPES)
    device = await request.app[STORE].update(
        request.match_info["id"],
        lambda _current: validated(document),
        if_match=request.headers.get(hdrs.IF_MATCH),
        if_none_match=request.headers.get(hdrs.IF_NONE_MATCH),
    )
    return device_response(device)


async def patch_device(request: web.Request) -> web.Response:
    """PATCH /devices/{id}: RFC 7396 merge patch; the result is validated like a PUT."""
    patch = await read_json(request, PATCH_TYPES)
    device = await request.app[STORE].update(
        request.match_info["id"],
        lambda current: patched(current, patch),
        if_match=request.headers.get(hdrs.IF_MATCH),
        if_none_match=request.headers.get(hdrs.IF_NONE_MATCH),
    )
    return device_response(device)


async def delete_device(request: web.Request) -> web.Response:
    """DELETE /devices/{id}: 204, 404, or 412 on a stale If-Match or a matching If-None-Match."""
    await request.app[STORE].delete(
        request.match_info["id"],
        if_match=request.headers.get(hdrs.IF_MATCH),
        if_none_match=request.headers.get(hdrs.IF_NONE_MATCH),
    )
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    """The API table. `openapi.py` describes exactly these (a test holds them together)."""
    return [
        web.get("/healthz", healthz),
        web.get("/openapi.json", get_openapi),
        web.get("/devices", list_devices),
        web.post("/devices", create_device),
        web.get("/devices/{id}", get_device),
        web.put("/devices/{id}", replace_device),
        web.patch("/devices/{id}", patch_device),
        web.delete("/devices/{id}", delete_device),
    ]
