"""`make run` (CONTRACT §1): inventory and gateway start together in the foreground, a request
flows through both, and Ctrl-C (SIGINT to the foreground process group) stops both cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.polling import free_port, poll_until
from tests.processes.inventory_process import REPO_ROOT

STOP_SECONDS = 15.0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make on PATH")
async def test_make_run_serves_through_the_gateway_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    inventory, public, admin = free_port(), free_port(), free_port()
    env = dict(
        os.environ,
        GATEWAY_LISTEN=f"127.0.0.1:{public}",
        GATEWAY_ADMIN=f"127.0.0.1:{admin}",
        INVENTORY_URL=f"http://127.0.0.1:{inventory}",
    )
    make = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "run",
        f"LISTEN_INVENTORY=127.0.0.1:{inventory}", f"INVENTORY_DB={tmp_path / 'inventory.db'}",
        cwd=REPO_ROOT, env=env, start_new_session=True,  # its own group, as a terminal gives
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def create() -> int:
                device = {"name": "Hall light", "type": "light", "room": "hall"}
                try:
                    url = f"http://127.0.0.1:{public}/api/inventory/devices"
                    key = {"X-API-Key": "dev-inventory-key"}  # the key README documents
                    async with session.post(url, json=device, headers=key) as resp:
                        return resp.status
                except aiohttp.ClientError:
                    return 0  # not listening yet

            created = await poll_until(create, lambda status: status == 201, within=30)
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C sends
        code = await asyncio.wait_for(make.wait(), STOP_SECONDS)
    finally:
        if make.returncode is None:
            os.killpg(make.pid, signal.SIGKILL)
            await make.wait()

    assert created == 201
    assert code in (0, 2, -signal.SIGINT)  # make dies by the signal it got, as shells expect
    with pytest.raises(ConnectionRefusedError):  # the gateway no longer listens
        await asyncio.open_connection("127.0.0.1", public)
    survivors = await asyncio.create_subprocess_exec(
        "pgrep", "-f", f"--listen 127.0.0.1:{inventory}", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await survivors.communicate()
    assert out == b"", "a process outlived Ctrl-C"
