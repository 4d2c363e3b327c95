"""`python -m inventory` stops cleanly on SIGINT and SIGTERM, and refuses a file in use."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.processes.inventory_process import EXIT_TIMEOUT_SECONDS, REPO_ROOT, InventoryProcess


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_stops_the_service_cleanly_with_the_store_closed(
    tmp_path: Path, signum: signal.Signals
) -> None:
    db = tmp_path / "inventory.db"
    service = await InventoryProcess.start(db, log_level="INFO")
    async with aiohttp.ClientSession() as session:
        body = {"name": "Hall light", "type": "light", "room": "hall"}
        async with session.post(f"{service.url}/devices", json=body) as resp:
            assert resp.status == 201

    assert await service.stop(signum) == 0

    assert f"store {db} closed" in service.output()
    # SQLite folded its log back into the file when the store closed.
    assert not await asyncio.to_thread(Path(f"{db}-wal").exists)


async def test_a_second_service_on_the_same_file_exits_1_and_says_why(tmp_path: Path) -> None:
    db = tmp_path / "inventory.db"
    first = await InventoryProcess.start(db)
    try:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inventory", "--db", str(db), "--listen", "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(second.communicate(), EXIT_TIMEOUT_SECONDS)
    finally:
        await first.stop(signal.SIGTERM)

    assert second.returncode == 1
    assert "database is locked (is another process using it?)" in stderr.decode()
