"""Run `python -m inventory` as a child process on a free loopback port, for process tests.

`InventoryProcess.start` launches it and polls `/healthz` until it answers or a deadline
passes (no sleep-and-hope). Its output goes to a log file next to the database, so a long
run can never block on a full pipe, and a failing test can show what the service said.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Final

import aiohttp

from tests.polling import free_port

REPO_ROOT: Final = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT_SECONDS: Final = 15.0
EXIT_TIMEOUT_SECONDS: Final = 15.0
POLL_SECONDS: Final = 0.05


class InventoryProcess:
    """One running `python -m inventory --db PATH --listen 127.0.0.1:PORT`."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    @classmethod
    async def start(cls, db: Path, *, log_level: str = "WARNING") -> InventoryProcess:
        port = free_port()
        log = db.with_name(f"{db.name}.{port}.log")
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "inventory", "--db", str(db),
                "--listen", f"127.0.0.1:{port}", "--log-level", log_level,
                stdout=sink, stderr=sink, cwd=REPO_ROOT,
            )  # fmt: skip
        service = cls(process, f"http://127.0.0.1:{port}", log)
        try:
            await service.wait_ready()
        except BaseException:
            await service.kill()
            raise
        return service

    async def wait_ready(self) -> None:
        """Poll /healthz until it answers 200; fail early if the process dies."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise AssertionError(f"inventory exited early:\n{self.output()}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(POLL_SECONDS)
        raise AssertionError(f"inventory not ready in {READY_TIMEOUT_SECONDS}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self, signum: signal.Signals) -> int:
        """Send `signum` and wait (bounded) for the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT_SECONDS)

    async def kill(self) -> int:
        return await self.stop(signal.SIGKILL)
