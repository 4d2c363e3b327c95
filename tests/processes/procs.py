"""Run `python -m gateway` as a child process on free loopback ports, for process tests.

`GatewayProcess.start` launches it and polls the admin `/healthz` until it answers or a
deadline passes (no sleep-and-hope). Standard output and error go to a log file, so a long
run never blocks on a full pipe and a failing test can show what the gateway said.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeVar

import aiohttp

from tests.polling import free_port
from tests.processes.inventory_process import REPO_ROOT

READY_TIMEOUT_SECONDS: Final = 15.0
EXIT_TIMEOUT_SECONDS: Final = 15.0
POLL_SECONDS: Final = 0.05


class GatewayProcess:
    """One running `python -m gateway --config FILE --listen ... --admin ...`."""

    def __init__(
        self, process: asyncio.subprocess.Process, port: int, admin_port: int, log: Path
    ) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.log = log

    @classmethod
    async def start(
        cls, config: Path, *, workers: int = 1, env: Mapping[str, str] | None = None
    ) -> GatewayProcess:
        port, admin_port = free_port(), free_port()
        log = config.with_name(f"gateway.{port}.log")
        args = ["--config", str(config), "--listen", f"127.0.0.1:{port}"]
        args += ["--admin", f"127.0.0.1:{admin_port}", "--workers", str(workers)]
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", *args,
                stdout=sink, stderr=sink, cwd=REPO_ROOT, env=None if env is None else dict(env),
                start_new_session=True,  # kill() can reach --workers children too
            )  # fmt: skip
        gateway = cls(process, port, admin_port, log)
        try:
            await gateway.wait_ready(workers)
        except BaseException:
            await gateway.kill()
            raise
        return gateway

    async def wait_ready(self, workers: int = 1) -> None:
        """Poll the admin /healthz until it answers 200 and every worker has said it listens;
        fail early if the process dies."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise AssertionError(f"gateway exited early:\n{self.output()}")
                try:
                    async with session.get(f"{self.admin_url}/healthz") as resp:
                        if resp.status == 200 and self.listening() >= workers:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(POLL_SECONDS)
        raise AssertionError(f"gateway not ready in {READY_TIMEOUT_SECONDS}s:\n{self.output()}")

    def listening(self) -> int:
        """How many processes have logged that they listen (one, or one per worker)."""
        return self.output().count('"message":"listening on ')

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, object]]:
        """Every JSON line the gateway wrote (access lines and event logs)."""
        lines = [line for line in self.output().splitlines() if line.startswith("{")]
        return [json.loads(line) for line in lines]

    def send_signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send `signum` and wait (bounded) for the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT_SECONDS)

    async def kill(self) -> int:
        """SIGKILL the whole process group: a supervisor and any worker it left behind."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT_SECONDS)


T = TypeVar("T")
