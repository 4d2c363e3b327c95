"""Fixtures for the inventory tests: a blocking-call tripwire, a store, and a live app.

`no_blocking_in_loop` runs every test under `blockbuster`, which makes file, socket,
sqlite3, lock and sleep calls raise `BlockingError` when they happen on a thread that is
running an event loop. The store does all its I/O on its own thread, so nothing in the
service should ever trip it. It needs no allowlist with aiohttp's test server: pytest and
pytest-aiohttp set up and tear down outside the running loop, and the one blocking call
left, the executor `shutdown` join in `DeviceStore.close`, goes through `asyncio.to_thread`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeAlias

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from blockbuster import BlockBuster, blockbuster_ctx
from pytest_aiohttp import AiohttpClient

from inventory.app import create_app
from inventory.schema import JSON
from inventory.store import DeviceStore

Client: TypeAlias = TestClient[web.Request, web.Application]
MakeDevice: TypeAlias = Callable[..., Awaitable[dict[str, JSON]]]

HALL_LIGHT: dict[str, JSON] = {
    "name": "Hall light",
    "type": "light",
    "room": "hall",
    "state": {"on": True, "brightness": 80},
}


@pytest.fixture(autouse=True)
def no_blocking_in_loop() -> Iterator[BlockBuster]:
    with blockbuster_ctx() as blockbuster:
        yield blockbuster


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "inventory.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[DeviceStore]:
    opened = await DeviceStore.open(db_path)
    yield opened
    await opened.close()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, db_path: Path) -> Client:
    return await aiohttp_client(create_app(db_path))


@pytest.fixture
def make_device(client: Client) -> MakeDevice:
    """POST a device (HALL_LIGHT with `changes` merged in) and return the 201 body."""

    async def make(**changes: JSON) -> dict[str, JSON]:
        async with client.post("/devices", json={**HALL_LIGHT, **changes}) as resp:
            assert resp.status == 201, await resp.text()
            body: dict[str, JSON] = await resp.json()
            return body

    return make
