"""Values the service cannot serve: refused before they are stored, and survived if stored.

JSON text can spell values that have no faithful JSON representation on the way out:
numbers beyond a 64-bit float (`1e400`), lone UTF-16 surrogates (`"\\ud800"`), and nesting
so deep that encoders recurse to death. A write carrying one is refused (400 or 422) and
stores nothing; a store that already holds one (written by an older version) still serves
everything, in the safe form the README documents.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
import shelve
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import hdrs
from pytest_aiohttp import AiohttpClient

from inventory.app import create_app
from inventory.patch import strong_etag
from inventory.schema import DEVICE_SCHEMA, JSON, MAX_DEPTH
from sqlshelf import SqliteMapping
from tests.inventory.conftest import HALL_LIGHT, Client, MakeDevice

JSON_HEADERS: dict[str, str] = {"Content-Type": "application/json"}
STAMP = "2025-01-31T18:04:05.123456Z"


def _nested(levels: int, leaf: str = "1") -> str:
    """`levels` objects inside each other as JSON text: `{"a":{"a":...leaf...}}`."""
    return '{"a":' * levels + leaf + "}" * levels


def _deep_state_device(levels: int) -> bytes:
    """A device whose whole body nests `levels` containers (the body is level 1)."""
    base = json.dumps({k: v for k, v in HALL_LIGHT.items() if k != "state"})
    return (base[:-1] + ', "state": ' + _nested(levels - 2, "{}") + "}").encode()


async def _send(
    client: Client, method: str, url: str, body: bytes, **headers: str
) -> tuple[int, dict[str, Any]]:
    """Send `body` as JSON; the answer must be a problem. Returns its status and body."""
    sent: dict[str, str] = {**JSON_HEADERS, **headers}
    async with client.request(method, url, data=body, headers=sent) as resp:
        assert resp.content_type == "application/problem+json", await resp.text()
        assert "Traceback" not in await resp.text()
        problem: dict[str, Any] = await resp.json(content_type=None)
        return resp.status, problem


async def _listed(client: Client) -> list[dict[str, Any]]:
    async with client.get("/devices", params={"limit": "500"}) as resp:
        assert resp.status == 200, await resp.text()
        items: list[dict[str, Any]] = (await resp.json())["items"]
        return items


# (body for POST and PUT, body for PATCH, the pointer of the refused value)
UNSERVABLE = [
    ('"state": {"level": 1e400}', '{"state": {"level": 1e400}}', "/state/level"),
    ('"state": {"level": -1e999}', '{"state": {"level": -1e999}}', "/state/level"),
    ('"state": {"deep": [0, [2e308]]}', '{"state": {"deep": [0, [2e308]]}}', "/state/deep/1/0"),
    ('"name": "\\ud800"', '{"name": "\\ud800"}', "/name"),
    ('"state": {"x": ["\\udfff"]}', '{"state": {"x": ["\\udfff"]}}', "/state/x/0"),
    ('"state": {"\\ud800": 1}', '{"state": {"\\ud800": 1}}', "/state/\ud800"),
]
UNSERVABLE_IDS = ["1e400", "-1e999", "nested-2e308", "surrogate", "nested-surrogate", "key"]


@pytest.mark.parametrize(("member", "patch", "pointer"), UNSERVABLE, ids=UNSERVABLE_IDS)
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "PATCH-merge"])
async def test_an_unservable_value_is_a_422_at_its_pointer_and_stores_nothing(
    client: Client, make_device: MakeDevice, method: str, member: str, patch: str, pointer: str
) -> None:
    device = await make_device()
    url = "/devices" if method == "POST" else f"/devices/{device['id']}"
    if method.startswith("PATCH"):
        body = patch.encode()
    else:
        base = {k: v for k, v in HALL_LIGHT.items() if k not in member}
        body = (json.dumps(base)[:-1] + ", " + member + "}").encode()
    headers = {hdrs.CONTENT_TYPE: "application/merge-patch+json"} if method == "PATCH-merge" else {}

    status, problem = await _send(client, method.removesuffix("-merge"), url, body, **headers)

    assert status == 422
    assert pointer in [error["path"] for error in problem["errors"]]
    assert await _listed(client) == [device]
    async with client.get(f"/devices/{device['id']}") as resp:
        assert await resp.json() == device


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "a", "type": "plug", "room": "\xed\xa0\x80"}',  # a surrogate, UTF-8-encoded
        b'{"name": "a", "type": "plug", "room": "\xed\xbf\xbf"}',
        b'{"name": "a", "type": "plug", "room": "r", "state": {"x": NaN}}',
        b'{"name": "a", "type": "plug", "room": "r", "state": {"x": -Infinity}}',
    ],
    ids=["raw-high-surrogate", "raw-low-surrogate", "NaN", "-Infinity"],
)
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_raw_surrogate_bytes_and_nan_literals_are_a_400_and_store_nothing(
    client: Client, make_device: MakeDevice, method: str, body: bytes
) -> None:
    device = await make_device()
    url = "/devices" if method == "POST" else f"/devices/{device['id']}"

    status, problem = await _send(client, method, url, body)

    assert status == 400
    assert "not valid JSON" in problem["detail"]
    assert await _listed(client) == [device]


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({**HALL_LIGHT}).encode("utf-16"),
        json.dumps({**HALL_LIGHT}).encode("utf-16-le"),
        json.dumps({**HALL_LIGHT}).encode("utf-16-be"),
        json.dumps({**HALL_LIGHT}).encode("utf-32"),
        json.dumps({**HALL_LIGHT}).encode("utf-8-sig"),
    ],
    ids=["utf-16-bom", "utf-16-le", "utf-16-be", "utf-32", "utf-8-bom"],
)
async def test_a_body_not_in_plain_utf_8_is_a_400(client: Client, body: bytes) -> None:
    status, problem = await _send(client, "POST", "/devices", body)

    assert status == 400
    assert "not valid JSON" in problem["detail"]
    assert await _listed(client) == []


async def test_a_body_nested_exactly_to_the_limit_is_stored(client: Client) -> None:
    body = _deep_state_device(MAX_DEPTH)
    async with client.post("/devices", data=body, headers=JSON_HEADERS) as resp:
        assert resp.status == 201, await resp.text()
        device = await resp.json()

    assert device["state"] == json.loads(body)["state"]
    async with client.get(f"/devices/{device['id']}") as resp:
        assert await resp.json() == device


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_a_body_nested_deeper_than_the_limit_is_a_422_at_the_first_too_deep_value(
    client: Client, make_device: MakeDevice, method: str
) -> None:
    device = await make_device()
    url = "/devices" if method == "POST" else f"/devices/{device['id']}"
    body = _deep_state_device(MAX_DEPTH + 1)
    if method == "PATCH":
        body = ('{"state": ' + _nested(MAX_DEPTH - 1, "{}") + "}").encode()

    status, problem = await _send(client, method, url, body)

    assert status == 422
    too_deep = "/state" + "/a" * (MAX_DEPTH - 1)  # the 33rd container
    assert problem["errors"] == [
        {"path": too_deep, "message": f"nested deeper than {MAX_DEPTH} levels"}
    ]
    assert await _listed(client) == [device]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"state": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
        b'{"name": "a", "type": "plug", "room": "r", "state": {"a": '
        + b"[" * 900
        + b"]" * 900
        + b"}}",
    ],
    ids=["open-brackets", "balanced-brackets", "deep-objects", "deep-but-parsable"],
)
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_extremely_deep_bodies_are_refused_without_a_traceback(
    client: Client, make_device: MakeDevice, method: str, body: bytes
) -> None:
    device = await make_device()
    url = "/devices" if method == "POST" else f"/devices/{device['id']}"

    status, problem = await _send(client, method, url, body)

    assert status in (400, 422)
    assert problem["status"] == status
    assert await _listed(client) == [device]


# -- a store that already holds unservable values (written before these checks existed) --


def _legacy(device_id: str, **fields: JSON) -> dict[str, JSON]:
    device: dict[str, JSON] = {"id": device_id, **HALL_LIGHT, **fields}
    device["created_at"] = device["updated_at"] = STAMP
    return device


def _too_deep(levels: int) -> JSON:
    value: JSON = 1
    for _ in range(levels):
        value = {"a": value}
    return value


LEGACY = {
    "1": _legacy("1", state={"level": math.inf, "low": -math.inf, "nan": math.nan}),
    "2": _legacy("2", name="Lamp \ud800", state={"\udfff": ["ok", "\ud83d"]}),
    "3": _legacy("3", name="Fine"),
    "4": _legacy("4", state={"deep": _too_deep(3000)}),
}


def _write_behind_the_services_back(db_path: Path) -> None:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # pickle the 3000-level value; unpickling does not recurse
    try:
        _write(db_path)
    finally:
        sys.setrecursionlimit(limit)


def _write(db_path: Path) -> None:
    shelf: shelve.Shelf[JSON] = shelve.Shelf(SqliteMapping(db_path), pickle.HIGHEST_PROTOCOL)
    try:
        for device_id, device in LEGACY.items():
            shelf[f"device:{device_id}"] = device
        shelf["meta:next_id"] = len(LEGACY) + 1
    finally:
        shelf.close()


@pytest.fixture
async def legacy_client(aiohttp_client: AiohttpClient, db_path: Path) -> Client:
    await asyncio.to_thread(_write_behind_the_services_back, db_path)
    return await aiohttp_client(create_app(db_path))


SAFE_FORMS = {
    "1": {"level": None, "low": None, "nan": None},
    "2": {"\ufffd": ["ok", "\ufffd"]},
    "3": HALL_LIGHT["state"],
}


async def test_a_stored_unservable_device_is_served_in_its_safe_form(legacy_client: Client) -> None:
    for device_id, state in SAFE_FORMS.items():
        async with legacy_client.get(f"/devices/{device_id}") as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.read()
            device = await resp.json()
        assert device["state"] == state
        assert resp.headers[hdrs.ETAG] == strong_etag(body)
        assert DEVICE_SCHEMA.output_errors(device) == []
    async with legacy_client.get("/devices/2") as resp:
        assert (await resp.json())["name"] == "Lamp \ufffd"
    async with legacy_client.get("/devices/4") as resp:
        assert resp.status == 200
        deep = (await resp.json())["state"]["deep"]
    for _ in range(MAX_DEPTH - 2):  # the body is level 1, state 2, deep 3 ...
        deep = deep["a"]
    assert deep is None  # cut where the nesting passes the limit


async def test_a_list_page_holding_unservable_devices_lists_them_all_in_safe_form(
    legacy_client: Client,
) -> None:
    items = await _listed(legacy_client)

    assert [item["id"] for item in items] == ["1", "2", "3", "4"]
    for item in items:
        async with legacy_client.get(f"/devices/{item['id']}") as resp:
            assert item == await resp.json()


@pytest.mark.parametrize("if_match", [None, "*", "etag"])
async def test_a_stored_unservable_device_can_be_deleted(
    legacy_client: Client, if_match: str | None
) -> None:
    for device_id in ("1", "2", "4"):
        url = f"/devices/{device_id}"
        headers = {} if if_match is None else {"If-Match": if_match}
        if if_match == "etag":
            async with legacy_client.get(url) as resp:
                headers["If-Match"] = resp.headers[hdrs.ETAG]
        async with legacy_client.delete(url, headers=headers) as resp:
            assert resp.status == 204, await resp.text()
        async with legacy_client.get(url) as resp:
            assert resp.status == 404

    assert [item["id"] for item in await _listed(legacy_client)] == ["3"]


async def test_a_stored_unservable_device_can_be_replaced_or_patched_in_its_safe_form(
    legacy_client: Client,
) -> None:
    async with legacy_client.put("/devices/1", json=HALL_LIGHT, headers={"If-Match": "*"}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["state"] == HALL_LIGHT["state"]

    async with legacy_client.patch("/devices/2", json={"name": "Lamp"}) as resp:
        assert resp.status == 200, await resp.text()
        patched = await resp.json()
    assert (patched["name"], patched["state"]) == ("Lamp", SAFE_FORMS["2"])
    async with legacy_client.get("/devices/2") as resp:
        assert await resp.json() == patched


async def test_opening_a_store_with_unservable_records_names_each_in_a_warning(
    aiohttp_client: AiohttpClient, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(_write_behind_the_services_back, db_path)

    with caplog.at_level(logging.WARNING, logger="inventory.store"):
        await aiohttp_client(create_app(db_path))

    warned = [r.getMessage() for r in caplog.records if r.name == "inventory.store"]
    assert sorted(message.split()[1] for message in warned) == ["1", "2", "4"]
    assert all("safe form" in message for message in warned)
