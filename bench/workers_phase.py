"""`make bench`'s workers phase: the small GET through `--workers 2` against one worker, in the
same run, on the same upstream and load generator (bench/routes.bench.yaml).

One worker runs on the proxy's CPU as in the main rounds. Two workers get both CPUs (a
worker pinned to each would be the same as pinning the group to both: the kernel spreads
SO_REUSEPORT connections over the two listening sockets), while the load generator and the
upstream stay on the other CPU as everywhere else in the bench. On a 2-core machine they
therefore share CPU 1 with the second worker: the ratio is then bounded by what that core
has left, not by the gateway, and the report says so. With four cores or more the load
generator gets its own and about 1.6x to 1.9x is what two workers should give.

bench/run.py calls `measure` after its main rounds and `section` / `verdicts` for its report.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH: Final = Path(__file__).resolve().parent
HOST: Final = "127.0.0.1"
EXPECTED: Final = 1.6  # the ratio two workers should reach when the load generator has a core


@dataclass
class WorkersRun:
    one: list[float] = field(default_factory=list)  # req/s per round, --workers 1
    two: list[float] = field(default_factory=list)  # req/s per round, --workers 2
    errors: int = 0
    cpus: int = 0
    limited_by: str = ""  # what bounded the ratio, when something besides the gateway did

    @property
    def ratio(self) -> float | None:
        if not self.one or not self.two:
            return None
        return max(self.two) / max(self.one)


def measure(
    *,
    start: Callable[..., Any],  # run.py's Processes.start(name, argv, env=...)
    pinned: Callable[[list[str]], list[str]],  # argv -> argv on the proxy's CPU
    unpinned: Callable[[list[str]], list[str]],  # argv -> argv on every CPU
    wait_ready: Callable[[Any, str, float], None],
    run_load: Callable[[str, float], Any],  # (url, seconds) -> Cell with .rps and .errors
    free_ports: Callable[[int], list[int]],
    env: dict[str, str],
    upstream_url: str,
    out: Path,
    rounds: int,
    duration: float,
    warmup: float,
    startup_deadline: float,
) -> WorkersRun:
    run = WorkersRun(cpus=os.cpu_count() or 1)
    if run.cpus <= 2:
        run.limited_by = (
            f"{run.cpus} CPUs: the second worker shares its core with the load generator and "
            "the upstream, so two workers cannot reach twice one worker's CPU"
        )
    gateways = {}
    for workers in (1, 2):
        gw_port, admin_port = free_ports(2)
        argv = [sys.executable, "-m", "gateway", "--config", str(BENCH / "routes.bench.yaml")]
        argv += ["--workers", str(workers)]
        gateway = start(
            f"gateway-workers-{workers}",
            pinned(argv) if workers == 1 else unpinned(argv),
            env=dict(
                env,
                BENCH_LISTEN=f"{HOST}:{gw_port}",
                BENCH_ADMIN=f"{HOST}:{admin_port}",
                BENCH_UPSTREAM=upstream_url,
                BENCH_ACCESS_LOG=str(out / f"gateway-workers-{workers}-access.log"),
            ),
        )
        base = f"http://{HOST}:{gw_port}"
        wait_ready(gateway, base + "/small", time.monotonic() + startup_deadline)
        gateways[workers] = (gateway, base)
    try:
        for round_index in range(rounds):
            order = (1, 2) if round_index % 2 == 0 else (2, 1)
            for workers in order:
                url = gateways[workers][1] + "/small"
                if warmup > 0:
                    run_load(url, warmup)
                cell = run_load(url, duration)
                (run.one if workers == 1 else run.two).append(cell.rps)
                run.errors += cell.errors
                print(
                    f"round {round_index + 1} small GET --workers {workers}: "
                    f"{cell.rps:10.0f} req/s" + (f"  ERRORS {cell.errors}" if cell.errors else ""),
                    flush=True,
                )
    finally:
        for gateway, _ in gateways.values():
            gateway.popen.terminate()
            gateway.popen.wait(timeout=15)
    return run


def section(run: WorkersRun | None) -> list[str]:
    if run is None:
        return []
    lines = [
        "## Workers",
        "",
        "Small JSON GET through `--workers 2` (both CPUs) against `--workers 1` (the proxy's",
        "CPU), best round of each, same load generator on the other CPU.",
        "",
        "| --workers 1 req/s | --workers 2 req/s | ratio | expected | CPUs |",
        "| ---: | ---: | ---: | --- | ---: |",
    ]
    ratio = run.ratio
    shown = "—" if ratio is None else f"{ratio:.2f}x"
    one = f"{max(run.one):,.0f}" if run.one else "—"
    two = f"{max(run.two):,.0f}" if run.two else "—"
    lines.append(f"| {one} | {two} | {shown} | ≈ {EXPECTED}x | {run.cpus} |")
    if run.limited_by:
        lines += ["", f"Limited by: {run.limited_by}."]
    return [*lines, ""]


def verdicts(run: WorkersRun | None) -> list[tuple[str, str, bool | None]]:
    if run is None or run.ratio is None:
        return []
    budget = f"--workers 2 small-GET req/s ≈ {EXPECTED} x one worker (load generator on its core)"
    measured = f"{max(run.two):,.0f} vs {max(run.one):,.0f} req/s = {run.ratio:.2f}x"
    if run.limited_by:  # the load generator had no core of its own: the budget does not apply
        return [(budget, f"{measured} ({run.limited_by})", None)]
    return [(budget, measured, run.ratio >= EXPECTED and not run.errors)]
