"""Every row of the inventory API table, over real sockets, plus If-Match and concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import hdrs

from inventory.patch import strong_etag
from inventory.schema import DEVICE_SCHEMA, JSON
from tests.inventory.conftest import HALL_LIGHT, Client, MakeDevice

SERVER_FIELDS = ("id", "created_at", "updated_at")


async def test_healthz_answers_200(client: Client) -> None:
    async with client.get("/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_post_answers_201_with_location_and_a_strong_etag_of_the_body(client: Client) -> None:
    async with client.post("/devices", json=HALL_LIGHT) as resp:
        body = await resp.read()
        device = await resp.json()

    assert resp.status == 201
    assert resp.headers[hdrs.LOCATION] == f"/devices/{device['id']}"
    assert resp.headers[hdrs.ETAG] == strong_etag(body)
    assert {k: v for k, v in device.items() if k not in SERVER_FIELDS} == HALL_LIGHT
    assert device["created_at"] == device["updated_at"]
    assert DEVICE_SCHEMA.output_errors(device) == []


async def test_post_fills_in_an_empty_state_when_it_is_left_out(client: Client) -> None:
    async with client.post(
        "/devices", json={"name": "Lock", "type": "lock", "room": "door"}
    ) as resp:
        assert resp.status == 201
        assert (await resp.json())["state"] == {}


async def test_location_carries_the_prefix_a_gateway_stripped(client: Client) -> None:
    headers = {"X-Forwarded-Prefix": "/api/inventory"}
    async with client.post("/devices", json=HALL_LIGHT, headers=headers) as resp:
        device = await resp.json()
        assert resp.headers[hdrs.LOCATION] == f"/api/inventory/devices/{device['id']}"


async def test_a_forwarded_prefix_that_is_not_a_path_is_ignored(client: Client) -> None:
    headers = {"X-Forwarded-Prefix": "https://evil.example"}
    async with client.post("/devices", json=HALL_LIGHT, headers=headers) as resp:
        assert resp.headers[hdrs.LOCATION].startswith("/devices/")


async def test_ids_increase_in_creation_order(make_device: MakeDevice) -> None:
    ids = [int((await make_device(name=f"d{i}"))["id"]) for i in range(3)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3


async def test_get_returns_the_device_with_the_etag_post_gave(
    client: Client, make_device: MakeDevice
) -> None:
    async with client.post("/devices", json=HALL_LIGHT) as created:
        device = await created.json()

    async with client.get(f"/devices/{device['id']}") as resp:
        assert resp.status == 200
        assert await resp.json() == device
        assert resp.headers[hdrs.ETAG] == created.headers[hdrs.ETAG]
        assert resp.headers[hdrs.ETAG] == strong_etag(await resp.read())


@pytest.mark.parametrize("device_id", ["999", "abc", "007", "0", "-1", "1e3", "٣"])
async def test_get_of_an_unknown_id_is_a_404_problem(
    client: Client, make_device: MakeDevice, device_id: str
) -> None:
    await make_device()
    async with client.get(f"/devices/{device_id}") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"


async def test_get_with_a_current_if_none_match_is_a_304(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()
    async with client.get(f"/devices/{device['id']}") as first:
        etag = first.headers[hdrs.ETAG]

    async with client.get(f"/devices/{device['id']}", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert resp.headers[hdrs.ETAG] == etag
    async with client.get(f"/devices/{device['id']}", headers={"If-None-Match": '"x"'}) as resp:
        assert resp.status == 200


async def test_put_replaces_the_whole_device(client: Client, make_device: MakeDevice) -> None:
    device = await make_device()
    replacement = {"name": "Desk lamp", "type": "light", "room": "study"}

    async with client.put(f"/devices/{device['id']}", json=replacement) as resp:
        assert resp.status == 200
        replaced = await resp.json()

    assert {k: v for k, v in replaced.items() if k not in SERVER_FIELDS} == {
        **replacement,
        "state": {},  # left out: back to its default, not kept from before
    }
    assert replaced["id"] == device["id"]
    assert replaced["created_at"] == device["created_at"]
    assert replaced["updated_at"] > device["updated_at"]
    async with client.get(f"/devices/{device['id']}") as after:
        assert await after.json() == replaced
        assert after.headers[hdrs.ETAG] == resp.headers[hdrs.ETAG]


async def test_put_of_an_unknown_id_is_a_404(client: Client) -> None:
    async with client.put("/devices/42", json=HALL_LIGHT) as resp:
        assert resp.status == 404


async def test_patch_merges_and_null_removes_a_member(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device(state={"on": True, "brightness": 80})
    patch = {"room": "kitchen", "state": {"brightness": None, "color": "warm"}}

    async with client.patch(
        f"/devices/{device['id']}",
        json=patch,
        headers={hdrs.CONTENT_TYPE: "application/merge-patch+json"},
    ) as resp:
        assert resp.status == 200
        patched = await resp.json()

    assert patched["room"] == "kitchen"
    assert patched["state"] == {"on": True, "color": "warm"}
    assert patched["name"] == device["name"]


async def test_patch_accepts_plain_application_json(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()
    async with client.patch(f"/devices/{device['id']}", json={"name": "Porch"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["name"] == "Porch"


async def test_patch_of_an_unknown_id_is_a_404(client: Client) -> None:
    async with client.patch("/devices/42", json={"name": "x"}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("patch", "errors"),
    [
        ({"name": ""}, [{"path": "/name", "message": "'' should be non-empty"}]),
        ({"name": None}, [{"path": "/name", "message": "required field is missing"}]),
        ({"state": [1]}, [{"path": "/state", "message": "[1] is not of type 'object'"}]),
        ({"colour": "red"}, [{"path": "/colour", "message": "unknown field"}]),
        (
            {"id": "9"},
            [{"path": "/id", "message": "server-owned field: the server sets it, do not send it"}],
        ),
        (
            {"id": None},
            [{"path": "/id", "message": "server-owned field: the server sets it, do not send it"}],
        ),
        ([1, 2], [{"path": "", "message": "[1, 2] is not of type 'object'"}]),
    ],
    ids=["empty-name", "name-removed", "state-array", "unknown", "id", "id-null", "not-object"],
)
async def test_a_patch_whose_result_is_invalid_is_a_422_and_changes_nothing(
    client: Client, make_device: MakeDevice, patch: JSON, errors: list[dict[str, str]]
) -> None:
    device = await make_device()

    async with client.patch(f"/devices/{device['id']}", json=patch) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"] == errors
    async with client.get(f"/devices/{device['id']}") as after:
        assert await after.json() == device


async def test_delete_answers_204_and_then_the_device_is_gone(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()

    async with client.delete(f"/devices/{device['id']}") as resp:
        assert resp.status == 204
    async with client.get(f"/devices/{device['id']}") as resp:
        assert resp.status == 404
    async with client.delete(f"/devices/{device['id']}") as resp:
        assert resp.status == 404


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_a_stale_if_match_is_a_412_and_changes_nothing(
    client: Client, make_device: MakeDevice, method: str
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"
    async with client.get(url) as resp:
        stale = resp.headers[hdrs.ETAG]
    async with client.patch(url, json={"room": "attic"}) as resp:  # someone else writes
        current = await resp.json()

    body = {**HALL_LIGHT, "name": "Mine"} if method != "DELETE" else None
    async with client.request(method, url, json=body, headers={"If-Match": stale}) as resp:
        assert resp.status == 412
        assert resp.content_type == "application/problem+json"
    async with client.get(url) as resp:
        assert await resp.json() == current


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_a_current_if_match_lets_the_write_through(
    client: Client, make_device: MakeDevice, method: str
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"
    async with client.get(url) as resp:
        etag = resp.headers[hdrs.ETAG]

    body = {**HALL_LIGHT, "name": "Mine"} if method != "DELETE" else None
    async with client.request(
        method, url, json=body, headers={"If-Match": f'"other", {etag}'}
    ) as resp:
        assert resp.status in (200, 204)


@pytest.mark.parametrize(
    ("if_match", "status"),
    [("*", 200), ('W/"{etag}"', 412), ("garbage", 412), ('"{etag}"', 200)],
    ids=["star", "weak-never-matches", "garbled", "strong"],
)
async def test_if_match_uses_strong_comparison(
    client: Client, make_device: MakeDevice, if_match: str, status: int
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"
    async with client.get(url) as resp:
        bare = resp.headers[hdrs.ETAG].strip('"')

    headers = {"If-Match": if_match.format(etag=bare)}
    async with client.patch(url, json={"room": "attic"}, headers=headers) as resp:
        assert resp.status == status


async def test_if_match_on_a_missing_device_is_a_404_not_a_412(client: Client) -> None:
    async with client.delete("/devices/77", headers={"If-Match": '"abc"'}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "if_none_match",
    ["*", "{etag}", "W/{etag}", '"other", {etag}', "garbage"],
    ids=["star", "current", "weak-current", "listed", "garbled"],
)
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_if_none_match_that_matches_an_existing_device_is_a_412_and_changes_nothing(
    client: Client, make_device: MakeDevice, method: str, if_none_match: str
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"
    async with client.get(url) as resp:
        etag = resp.headers[hdrs.ETAG]

    body = {**HALL_LIGHT, "name": "Mine"} if method != "DELETE" else None
    headers = {"If-None-Match": if_none_match.format(etag=etag)}
    async with client.request(method, url, json=body, headers=headers) as resp:
        assert resp.status == 412  # RFC 9110 §13.1.2: the condition is false
        assert resp.content_type == "application/problem+json"
    async with client.get(url) as resp:
        assert await resp.json() == device


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_if_none_match_naming_another_etag_lets_the_write_through(
    client: Client, make_device: MakeDevice, method: str
) -> None:
    device = await make_device()
    body = {**HALL_LIGHT, "name": "Mine"} if method != "DELETE" else None
    headers = {"If-None-Match": '"other", W/"older"', "If-Match": "*"}
    async with client.request(
        method, f"/devices/{device['id']}", json=body, headers=headers
    ) as resp:
        assert resp.status in (200, 204)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_if_none_match_star_on_a_missing_device_is_a_404(client: Client, method: str) -> None:
    # The condition is true (no current representation), so the request goes on, and a
    # PUT cannot create a device with a client-chosen id: 404, as without the header.
    body = HALL_LIGHT if method != "DELETE" else None
    async with client.request(
        method, "/devices/42", json=body, headers={"If-None-Match": "*"}
    ) as resp:
        assert resp.status == 404


async def test_a_stale_if_match_wins_over_an_invalid_body(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()
    headers = {"If-Match": '"stale"'}
    async with client.put(f"/devices/{device['id']}", json={"name": ""}, headers=headers) as resp:
        assert (
            resp.status == 412
        )  # preconditions are evaluated before the content (RFC 9110 §13.2.2)


async def test_two_clients_can_never_silently_overwrite_each_other(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"
    async with client.get(url) as alice_read, client.get(url) as bob_read:
        alice_etag = alice_read.headers[hdrs.ETAG]
        bob_etag = bob_read.headers[hdrs.ETAG]

    async with client.patch(
        url, json={"name": "Alice's"}, headers={"If-Match": alice_etag}
    ) as resp:
        assert resp.status == 200
    async with client.patch(url, json={"room": "Bob's"}, headers={"If-Match": bob_etag}) as resp:
        assert resp.status == 412

    async with client.get(url) as resp:
        final = await resp.json()
    assert (final["name"], final["room"]) == ("Alice's", device["room"])


async def test_concurrent_posts_get_distinct_ids_and_all_read_back(client: Client) -> None:
    async def post(i: int) -> dict[str, Any]:
        async with client.post("/devices", json={**HALL_LIGHT, "name": f"d{i}"}) as resp:
            assert resp.status == 201
            body: dict[str, Any] = await resp.json()
            return body

    created = await asyncio.gather(*(post(i) for i in range(40)))

    assert len({d["id"] for d in created}) == 40
    async with client.get("/devices", params={"limit": "500"}) as resp:
        listed = (await resp.json())["items"]
    assert sorted(listed, key=lambda d: int(d["id"])) == sorted(created, key=lambda d: int(d["id"]))


async def test_concurrent_writers_never_interleave_a_record(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"

    async def put(i: int) -> None:
        body = {"name": f"n{i}", "type": "plug", "room": f"r{i}", "state": {"writer": i}}
        async with client.put(url, json=body) as resp:
            assert resp.status == 200

    async def patch(i: int) -> None:
        async with client.patch(
            url, json={"name": f"n{i}", "room": f"r{i}", "state": {"writer": i}}
        ) as resp:
            assert resp.status == 200

    await asyncio.gather(*(put(i) if i % 2 else patch(i) for i in range(30)))

    async with client.get(url) as resp:
        final = await resp.json()
    writer = final["state"]["writer"]
    assert (final["name"], final["room"], final["state"]) == (
        f"n{writer}",
        f"r{writer}",
        {"writer": writer},
    )


async def test_of_concurrent_writers_holding_one_etag_exactly_one_wins(
    client: Client, make_device: MakeDevice
) -> None:
    device = await make_device()
    url = f"/devices/{device['id']}"
    async with client.get(url) as resp:
        etag = resp.headers[hdrs.ETAG]

    async def patch(i: int) -> int:
        async with client.patch(url, json={"name": f"w{i}"}, headers={"If-Match": etag}) as resp:
            return resp.status

    statuses = await asyncio.gather(*(patch(i) for i in range(20)))

    assert sorted(statuses) == [200] + [412] * 19
