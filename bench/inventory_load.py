"""Load test for the inventory service: GET latency with and without concurrent writers.

Starts `python -m inventory` on a free loopback port with a fresh database in a temporary
directory, seeds it, then runs two phases of equal length:

1. a GET loop alone (`GET /devices/{id}` of random seeded devices, one request at a time);
2. the same GET loop while WRITERS concurrent clients POST and PATCH as fast as they can.

It prints GET p50/p99 for both phases and the write throughput and latency of phase 2,
which shows what one store thread with an fsync per write costs readers. Run:

    .venv/bin/python bench/inventory_load.py [--duration 10] [--writers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

READY_TIMEOUT_SECONDS: Final = 15.0
SEED_DEVICES: Final = 200
DEVICE: Final = {"name": "Bench light", "type": "light", "room": "lab", "state": {"on": True}}


@dataclass
class Sample:
    """Latencies (seconds) of one kind of request in one phase."""

    latencies: list[float] = field(default_factory=list)

    def percentile(self, p: int) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1]

    def row(self) -> str:
        ms = [self.percentile(p) * 1000 for p in (50, 99)]
        return f"{len(self.latencies):>7} {ms[0]:>8.2f} {ms[1]:>8.2f}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def start_service(db: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inventory", "--db", str(db),
        "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and process.returncode is None:
            try:
                async with session.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return process, url
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    process.kill()
    await process.wait()
    raise SystemExit("inventory did not become ready")


async def seed(session: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        async with session.post(f"{url}/devices", json=DEVICE) as resp:
            ids.append((await resp.json())["id"])
    return ids


async def get_loop(
    session: aiohttp.ClientSession, url: str, ids: list[str], until: float, sample: Sample
) -> None:
    while time.monotonic() < until:
        started = time.perf_counter()
        async with session.get(f"{url}/devices/{random.choice(ids)}") as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        sample.latencies.append(time.perf_counter() - started)


async def write_loop(
    session: aiohttp.ClientSession, url: str, until: float, sample: Sample
) -> None:
    device_id: str | None = None
    n = 0
    while time.monotonic() < until:
        started = time.perf_counter()
        if device_id is None or n % 4 == 0:  # one create, then three patches
            async with session.post(f"{url}/devices", json=DEVICE) as resp:
                device_id = (await resp.json())["id"]
                assert resp.status == 201, resp.status
        else:
            patch = {"state": {"brightness": n % 100}}
            async with session.patch(f"{url}/devices/{device_id}", json=patch) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
        sample.latencies.append(time.perf_counter() - started)
        n += 1


async def run(duration: float, writers: int) -> None:
    phase = duration / 2
    with tempfile.TemporaryDirectory(prefix="inventory-bench-") as directory:
        process, url = await start_service(Path(directory) / "inventory.db")
        try:
            connector = aiohttp.TCPConnector(limit=writers + 4)
            async with aiohttp.ClientSession(connector=connector) as session:
                ids = await seed(session, url, SEED_DEVICES)
                alone, mixed, writes = Sample(), Sample(), Sample()
                await get_loop(session, url, ids, time.monotonic() + phase, alone)
                until = time.monotonic() + phase
                await asyncio.gather(
                    get_loop(session, url, ids, until, mixed),
                    *(write_loop(session, url, until, writes) for _ in range(writers)),
                )
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 15)
    report(phase, writers, alone, mixed, writes)


def report(phase: float, writers: int, alone: Sample, mixed: Sample, writes: Sample) -> None:
    print(f"inventory load: {phase:.1f} s per phase, {writers} writers, 1 GET loop, "
          f"{SEED_DEVICES} seeded devices")  # fmt: skip
    print(f"{'phase':<24} {'count':>7} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'GET, no writes':<24} {alone.row()}")
    print(f"{'GET, while writing':<24} {mixed.row()}")
    print(f"{'writes (POST/PATCH)':<24} {writes.row()}")
    print(f"write throughput: {len(writes.latencies) / phase:.0f} writes/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="total seconds (two phases)")
    parser.add_argument("--writers", type=int, default=8, help="concurrent writing clients")
    args = parser.parse_args()
    asyncio.run(run(args.duration, args.writers))


if __name__ == "__main__":
    main()
