"""`make bench`'s composition phase, short by design: an aggregate of 3 parts through the
gateway (GET /agg, routes.bench.yaml: three GETs of /small, run concurrently by the gateway)
beside the same three GETs made by the client one after another through the gateway. Both
count one "answer" per three upstream responses, so req/s and latency compare directly.

The client is this script (aiohttp, `CONNECTIONS` workers in a loop), the same for both, for
`seconds` per round, interleaved over rounds; the best round by req/s is kept. bench/run.py
calls `measure` after its auth phase and `section` for its report.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp

CONNECTIONS: Final = 16
SECONDS: Final = 3.0  # per round and way: a short phase
WAYS: Final = {
    "aggregate": ("aggregate of 3 parts (one request)", ("/agg",)),
    "sequential": ("the 3 GETs one after another", ("/small", "/small", "/small")),
}


@dataclass
class Way:
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def best(self) -> tuple[float, float, float]:
        i = max(range(len(self.rps)), key=self.rps.__getitem__)
        return self.rps[i], self.p50_ms[i], self.p99_ms[i]


async def _drive(
    base: str, paths: tuple[str, ...], seconds: float
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                started = time.perf_counter()
                for path in paths:
                    async with session.get(base + path) as resp:
                        await resp.read()
                        errors += resp.status != 200
                latencies.append(time.perf_counter() - started)

        warm = time.perf_counter() + min(1.0, seconds / 3)
        await asyncio.gather(*(worker(warm) for _ in range(CONNECTIONS)))
        latencies.clear()
        began = time.perf_counter()
        await asyncio.gather(*(worker(began + seconds) for _ in range(CONNECTIONS)))
        took = time.perf_counter() - began
    return len(latencies) / took, sorted(latencies), errors


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def measure(base: str, rounds: int, seconds: float = SECONDS) -> dict[str, Way]:
    ways = {name: Way() for name in WAYS}
    for round_index in range(rounds):
        order = list(WAYS) if round_index % 2 == 0 else list(WAYS)[::-1]
        for name in order:
            label, paths = WAYS[name]
            rps, ordered, errors = asyncio.run(_drive(base, paths, seconds))
            way = ways[name]
            way.rps.append(rps)
            way.p50_ms.append(_quantile(ordered, 0.5))
            way.p99_ms.append(_quantile(ordered, 0.99))
            way.errors += errors
            print(
                f"round {round_index + 1} {label:>36}: {rps:8.0f} answers/s"
                f"  p50 {way.p50_ms[-1]:6.2f} ms  p99 {way.p99_ms[-1]:6.2f} ms"
                + (f"  ERRORS {errors}" if errors else ""),
                flush=True,
            )
    return ways


def section(ways: dict[str, Way]) -> list[str]:
    if not ways or not all(way.rps for way in ways.values()):
        return []
    lines = [
        "## Composition (short)",
        "",
        f"Three GETs of /small per answer, through the gateway; this script's aiohttp client, "
        f"{CONNECTIONS} connections, best round by answers/s.",
        "",
        "| way | answers/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (label, _) in WAYS.items():
        rps, p50, p99 = ways[name].best()
        lines.append(f"| {label} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {ways[name].errors} |")
    return lines
