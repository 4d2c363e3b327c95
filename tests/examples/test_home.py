"""The smart-home examples in the shipped routes.yaml, over a real inventory service:
GET /api/home (aggregate), GET /api/home/rooms and POST /api/home/scenes/{name} (compose)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from inventory.app import create_app
from inventory.handlers import STORE
from tests.examples.conftest import REPO, MakeGateway
from tests.gateway.conftest import GatewayClient

KEY = {"X-API-Key": "dev-inventory-key"}  # the development key README documents
DEVICES = [
    {"name": "Hall light", "type": "light", "room": "hall", "state": {"on": True}},
    {"name": "Desk lamp", "type": "light", "room": "study", "state": {"on": False}},
    {"name": "Porch light", "type": "light", "room": "porch", "state": {"on": True}},
    {"name": "Front door", "type": "lock", "room": "hall", "state": {"locked": False}},
    {"name": "Back door", "type": "lock", "room": "kitchen", "state": {"locked": True}},
    {"name": "Thermostat", "type": "thermostat", "room": "hall", "state": {"target": 20}},
]


async def inventory(
    aiohttp_server: AiohttpServer, tmp_path: Path, meddle: str | None = None
) -> TestServer:
    """A live inventory with DEVICES; `meddle`: a device name someone renames just before the
    gateway's first write to it lands (a concurrent change)."""
    app = create_app(tmp_path / "inventory.db")
    if meddle is not None:
        app.middlewares.append(_meddler(meddle))
    server = await aiohttp_server(app)
    return server


def _meddler(name: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    done: list[bool] = []

    @web.middleware
    async def meddle(
        request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method == "PATCH" and not done:
            store = request.app[STORE]
            device = await store.get(request.match_info["id"])
            if device["name"] == name:
                done.append(True)
                await store.update(
                    device["id"], lambda f: {**f, "name": f"{name} (renamed)"}, if_match=None
                )
        return await handler(request)

    return meddle


async def seeded(gateway_from: MakeGateway, server: TestServer) -> GatewayClient:
    client = await gateway_from(
        REPO / "routes.yaml", {"INVENTORY_URL": str(server.make_url("")).rstrip("/")}
    )
    for device in DEVICES:
        resp = await client.post("/api/inventory/devices", json=device, headers=KEY)
        assert resp.status == 201
    return client


async def test_home_aggregates_every_device_the_lights_and_the_locks(
    aiohttp_server: AiohttpServer, tmp_path: Path, gateway_from: MakeGateway
) -> None:
    client = await seeded(gateway_from, await inventory(aiohttp_server, tmp_path))

    resp = await client.get("/api/home", headers=KEY)
    body = await resp.json()

    assert resp.status == 200
    assert len(body["devices"]["items"]) == 6
    assert [d["name"] for d in body["lights"]["items"]] == [
        "Hall light",
        "Desk lamp",
        "Porch light",
    ]
    assert [d["name"] for d in body["locks"]["items"]] == ["Front door", "Back door"]
    assert body["partial"] == []
    assert (await client.get("/api/home")).status == 401


async def test_rooms_counts_devices_per_room_and_type(
    aiohttp_server: AiohttpServer, tmp_path: Path, gateway_from: MakeGateway
) -> None:
    client = await seeded(gateway_from, await inventory(aiohttp_server, tmp_path))

    resp = await client.get("/api/home/rooms", headers=KEY)

    assert resp.status == 200
    assert await resp.json() == {
        "hall": {"total": 3, "light": 1, "lock": 1, "thermostat": 1},
        "kitchen": {"total": 1, "lock": 1},
        "porch": {"total": 1, "light": 1},
        "study": {"total": 1, "light": 1},
    }


async def test_the_night_scene_turns_lights_off_and_locks_locks_and_never_overwrites_a_change(
    aiohttp_server: AiohttpServer, tmp_path: Path, gateway_from: MakeGateway
) -> None:
    server = await inventory(aiohttp_server, tmp_path, meddle="Porch light")
    client = await seeded(gateway_from, server)

    resp = await client.post("/api/home/scenes/night", headers=KEY)
    body = await resp.json()
    listed = await client.get("/api/inventory/devices", headers=KEY)
    after = {d["name"]: d["state"] for d in (await listed.json())["items"]}

    assert resp.status == 200
    assert {d["name"]: d["state"] for d in body["changed"]} == {
        "Hall light": {"on": False},
        "Front door": {"locked": True},
    }
    assert {d["name"]: d["reason"] for d in body["unchanged"]} == {
        "Desk lamp": "already off",
        "Porch light": "changed by someone else meanwhile; not overwritten",
        "Back door": "already locked",
    }
    assert after["Hall light"] == {"on": False}
    assert after["Front door"] == {"locked": True}
    assert after["Porch light (renamed)"] == {"on": True}  # the other writer's version stands


async def test_an_unknown_scene_is_404_listing_the_scenes(
    aiohttp_server: AiohttpServer, tmp_path: Path, gateway_from: MakeGateway
) -> None:
    client = await seeded(gateway_from, await inventory(aiohttp_server, tmp_path))

    resp = await client.post("/api/home/scenes/party", headers=KEY)

    assert resp.status == 404
    assert (await resp.json())["scenes"] == ["morning", "night"]
