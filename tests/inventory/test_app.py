"""The application factory: the store opens on startup and is closed on cleanup."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from inventory.app import MAX_BODY_BYTES, create_app
from inventory.handlers import STORE
from tests.inventory.conftest import HALL_LIGHT


def test_the_factory_builds_the_app_without_touching_the_disk(tmp_path: Path) -> None:
    app = create_app(tmp_path / "later.db")

    assert app._client_max_size == MAX_BODY_BYTES
    assert not (tmp_path / "later.db").exists()  # the store opens on startup, not here


async def test_the_store_opens_on_startup_and_closes_on_cleanup(db_path: Path) -> None:
    app = create_app(db_path)
    async with TestClient(TestServer(app)) as client:
        assert STORE in app
        async with client.post("/devices", json=HALL_LIGHT) as resp:
            assert resp.status == 201
        assert await asyncio.to_thread(Path(f"{db_path}-wal").exists)

    # Closed: SQLite folded its WAL back into the file and removed it.
    assert not await asyncio.to_thread(Path(f"{db_path}-wal").exists)


async def test_a_restarted_app_serves_what_the_last_one_stored(db_path: Path) -> None:
    async with (
        TestClient(TestServer(create_app(db_path))) as client,
        client.post("/devices", json=HALL_LIGHT) as resp,
    ):
        device = await resp.json()

    async with (
        TestClient(TestServer(create_app(db_path))) as client,
        client.get(f"/devices/{device['id']}") as resp,
    ):
        assert await resp.json() == device
