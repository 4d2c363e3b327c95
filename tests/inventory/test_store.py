"""DeviceStore: CRUD, durability on return, ids, preconditions, and its one thread."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from blockbuster import BlockingError

from inventory.errors import DeviceNotFound, PreconditionFailed
from inventory.patch import etag_of
from inventory.store import THREAD_NAME, DeviceStore, Fields, Filters, StoreError, client_fields
from tests.inventory.conftest import HALL_LIGHT

LIGHT: Fields = {**HALL_LIGHT}


async def test_a_created_device_reads_back_with_server_fields(store: DeviceStore) -> None:
    device = await store.create(LIGHT)

    assert list(device) == ["id", "name", "type", "room", "state", "created_at", "updated_at"]
    assert client_fields(device) == LIGHT
    assert await store.get(device["id"]) == device


@pytest.mark.parametrize("device_id", ["2", "x", "", "01", "9" * 30])
async def test_getting_an_unknown_id_raises_not_found(store: DeviceStore, device_id: str) -> None:
    await store.create(LIGHT)
    with pytest.raises(DeviceNotFound):
        await store.get(device_id)


async def test_an_update_applies_the_edit_to_the_current_fields(store: DeviceStore) -> None:
    device = await store.create(LIGHT)

    updated = await store.update(device["id"], lambda cur: {**cur, "room": "attic"}, if_match=None)

    assert updated["room"] == "attic"
    assert updated["created_at"] == device["created_at"]
    assert await store.get(device["id"]) == updated


async def test_a_stale_if_match_raises_and_leaves_the_device_alone(store: DeviceStore) -> None:
    device = await store.create(LIGHT)
    stale = etag_of(device)
    await store.update(device["id"], lambda cur: cur, if_match=stale)

    with pytest.raises(PreconditionFailed):
        await store.update(device["id"], lambda cur: {**cur, "name": "x"}, if_match=stale)
    with pytest.raises(PreconditionFailed):
        await store.delete(device["id"], if_match=stale)
    assert (await store.get(device["id"]))["name"] == LIGHT["name"]


async def test_every_write_moves_updated_at_even_when_the_clock_stands_still(db_path: Path) -> None:
    frozen = datetime(2025, 1, 31, 18, 4, 5, tzinfo=UTC)
    store = await DeviceStore.open(db_path, clock=lambda: frozen)
    try:
        device = await store.create(LIGHT)
        again = await store.update(device["id"], lambda cur: cur, if_match=None)
        third = await store.update(device["id"], lambda cur: cur, if_match=None)
    finally:
        await store.close()

    assert device["updated_at"] < again["updated_at"] < third["updated_at"]
    assert len({etag_of(device), etag_of(again), etag_of(third)}) == 3


async def test_a_deleted_device_is_gone_and_its_id_is_never_reused(db_path: Path) -> None:
    store = await DeviceStore.open(db_path)
    first = await store.create(LIGHT)
    newest = await store.create(LIGHT)
    await store.delete(newest["id"], if_match=None)
    await store.close()

    store = await DeviceStore.open(db_path)
    try:
        with pytest.raises(DeviceNotFound):
            await store.get(newest["id"])
        assert await store.get(first["id"]) == first
        assert int((await store.create(LIGHT))["id"]) > int(newest["id"])
    finally:
        await store.close()


async def test_an_acknowledged_write_is_already_in_the_files(
    store: DeviceStore, db_path: Path
) -> None:
    device = await store.create(LIGHT)

    # Copy the live files as a crash would leave them, and open the copy with plain sqlite3.
    copy = db_path.with_name("copy.db")
    await asyncio.to_thread(shutil.copy, db_path, copy)
    await asyncio.to_thread(shutil.copy, f"{db_path}-wal", f"{copy}-wal")

    def keys() -> list[bytes]:
        with sqlite3.connect(copy) as cx:
            return [row[0] for row in cx.execute("SELECT key FROM Dict")]

    assert f"device:{device['id']}".encode() in await asyncio.to_thread(keys)


async def test_a_second_store_on_the_same_file_is_refused(
    store: DeviceStore, db_path: Path
) -> None:
    with pytest.raises(StoreError, match="locked"):
        await DeviceStore.open(db_path, lock_timeout=0.05)


async def test_many_concurrent_creates_get_distinct_ids_that_all_persist(db_path: Path) -> None:
    store = await DeviceStore.open(db_path)
    created = await asyncio.gather(*(store.create({**LIGHT, "name": f"d{i}"}) for i in range(100)))
    await store.close()

    store = await DeviceStore.open(db_path)
    try:
        listed = (await store.page(Filters(), None, 500)).items
    finally:
        await store.close()
    assert len({d["id"] for d in created}) == 100
    assert sorted(listed, key=lambda d: d["name"]) == sorted(created, key=lambda d: d["name"])


async def test_every_operation_runs_on_the_one_store_thread(db_path: Path) -> None:
    threads: set[str] = set()

    def clock() -> datetime:
        threads.add(threading.current_thread().name)
        return datetime.now(UTC)

    def edit(fields: Fields) -> Fields:
        threads.add(threading.current_thread().name)
        return fields

    store = await DeviceStore.open(db_path, clock=clock)
    try:
        await asyncio.gather(*(store.create(LIGHT) for _ in range(10)))
        await asyncio.gather(*(store.update(str(i), edit, if_match=None) for i in range(1, 11)))
    finally:
        await store.close()

    assert len(threads) == 1
    assert threads.pop().startswith(THREAD_NAME)


async def test_a_slow_store_operation_does_not_stall_the_event_loop(store: DeviceStore) -> None:
    device = await store.create(LIGHT)

    def slow_edit(fields: Fields) -> Fields:
        time.sleep(0.3)  # on the store thread: allowed, and the loop must keep going
        return fields

    update = asyncio.create_task(store.update(device["id"], slow_edit, if_match=None))
    ticks = 0
    started = time.monotonic()
    while not update.done():
        await asyncio.sleep(0.01)
        ticks += 1
    await update

    assert time.monotonic() - started >= 0.3
    assert ticks >= 10  # the loop ran timers throughout instead of waiting on the store


async def test_blocking_calls_on_the_event_loop_are_caught_by_the_tripwire() -> None:
    connection = sqlite3.connect(":memory:")
    try:
        with pytest.raises(BlockingError):
            connection.execute("SELECT 1")
    finally:
        connection.close()
    with pytest.raises(BlockingError):
        time.sleep(0.001)  # noqa: ASYNC251 -- on purpose: the tripwire must catch it


async def test_closing_folds_the_wal_into_the_file(db_path: Path) -> None:
    store = await DeviceStore.open(db_path)
    await store.create(LIGHT)
    assert await asyncio.to_thread(Path(f"{db_path}-wal").exists)

    await store.close()

    assert not await asyncio.to_thread(Path(f"{db_path}-wal").exists)
