"""kill -9 durability: every write the service acknowledged is there after a restart.

Writers hammer a real `python -m inventory` with POSTs and PATCHes; once enough have been
acknowledged the process gets SIGKILL while requests are still in flight, and a new process
starts on the same file. Every 201 must read back as created, and every device must show
its last acknowledged PATCH (or the one in flight at the kill, which may have landed too).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.processes.inventory_process import InventoryProcess

WRITERS = 8
KILL_AFTER_ACKS = (60, 200)  # one kill early in a run, one later
ROUND_TIMEOUT_SECONDS = 10.0


@dataclass
class Acknowledged:
    """What the service said 201/200 to; `in_flight` is the PATCH seq sent but unanswered."""

    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    patched_seq: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    count: int = 0
    target: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def ack(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    def aim(self, more: int) -> None:
        """Set `reached` once `more` further acknowledgements have come in."""
        self.target = self.count + more
        self.reached.clear()


async def _writer(session: aiohttp.ClientSession, url: str, n: int, acks: Acknowledged) -> None:
    """Create a device, then PATCH its state.seq upward, until the connection dies."""
    body = {"name": f"writer {n}", "type": "sensor", "room": f"room {n % 3}", "state": {"seq": 0}}
    try:
        while True:
            async with session.post(f"{url}/devices", json=body) as resp:
                assert resp.status == 201, await resp.text()
                device = await resp.json()
            acks.created[device["id"]] = device
            acks.patched_seq[device["id"]] = 0
            acks.ack()
            for seq in range(1, 6):
                acks.in_flight[device["id"]] = seq
                patch = {"state": {"seq": seq}}
                async with session.patch(f"{url}/devices/{device['id']}", json=patch) as resp:
                    assert resp.status == 200, await resp.text()
                acks.patched_seq[device["id"]] = seq
                acks.ack()
    except (aiohttp.ClientError, TimeoutError):
        return  # the service was killed under us: expected


async def _write_until_killed(
    service: InventoryProcess, acks: Acknowledged, kill_after: int
) -> None:
    acks.aim(kill_after)
    timeout = aiohttp.ClientTimeout(total=ROUND_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        writers = [
            asyncio.create_task(_writer(session, service.url, n, acks)) for n in range(WRITERS)
        ]
        try:
            await asyncio.wait_for(acks.reached.wait(), ROUND_TIMEOUT_SECONDS)
        except TimeoutError:
            raise AssertionError(f"only {acks.count} acks:\n{service.output()}") from None
        assert not any(w.done() for w in writers), "writers must still be mid-stream at the kill"

        assert await service.kill() == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*writers), ROUND_TIMEOUT_SECONDS)


async def _assert_all_acknowledged_writes_present(url: str, acks: Acknowledged) -> None:
    async with aiohttp.ClientSession() as session:
        listed: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        while True:
            params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
            async with session.get(f"{url}/devices", params=params) as resp:
                assert resp.status == 200
                page = await resp.json()
            listed.update((d["id"], d) for d in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break

    for device_id, created in acks.created.items():
        assert device_id in listed, f"acknowledged device {device_id} lost"
        stored = listed[device_id]
        assert {k: stored[k] for k in ("name", "type", "room", "created_at")} == {
            k: created[k] for k in ("name", "type", "room", "created_at")
        }
        seq = stored["state"]["seq"]
        acked = acks.patched_seq[device_id]
        assert seq in (acked, acks.in_flight.get(device_id, acked)), (device_id, seq, acked)


async def test_no_acknowledged_write_is_lost_to_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "inventory.db"
    acks = Acknowledged()

    for kill_after in KILL_AFTER_ACKS:
        service = await InventoryProcess.start(db)
        await _assert_all_acknowledged_writes_present(service.url, acks)
        await _write_until_killed(service, acks, kill_after)

    service = await InventoryProcess.start(db)
    try:
        await _assert_all_acknowledged_writes_present(service.url, acks)
        async with aiohttp.ClientSession() as session:  # and it still takes writes
            body = {"name": "after", "type": "plug", "room": "r"}
            async with session.post(f"{service.url}/devices", json=body) as resp:
                assert resp.status == 201
                new_id = int((await resp.json())["id"])
        assert new_id > max(int(i) for i in acks.created)  # ids are never reused
    finally:
        assert await service.stop(signal.SIGTERM) == 0

    def integrity() -> str:
        with sqlite3.connect(db) as cx:
            result: str = cx.execute("PRAGMA integrity_check").fetchone()[0]
            return result

    assert await asyncio.to_thread(integrity) == "ok"
