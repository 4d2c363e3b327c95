"""`make bench`'s cache phase, short: the small GET answered from the response cache (HIT)
beside the same upstream URL forwarded uncached by the same gateway process, and direct to the
upstream, in the same run, interleaved over rounds. Budget: HIT req/s >= 1.5 x uncached.

Short by design (at most `SHORT_SECONDS` measured per cell, `SHORT_WARMUP` warm-up): a hit
costs no upstream time, so the ratio settles fast. bench/run.py calls `measure` after its
main rounds and `section` / `verdicts` for its report; the config is bench/routes.cache.yaml.
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH: Final = Path(__file__).resolve().parent
HOST: Final = "127.0.0.1"
BUDGET: Final = 1.5  # HIT req/s >= this x the uncached route's
SHORT_SECONDS: Final = 3.0
SHORT_WARMUP: Final = 1.0
WHICH: Final = {"direct": "/small", "uncached": "/small", "hit": "/cached/small"}


@dataclass
class CacheRun:
    rps: dict[str, list[float]] = field(default_factory=dict)  # which -> req/s per round
    # The gateway's CPU µs per request (all threads), per window: the figure that holds up
    # when other work shares the machine (the ratio of req/s does not).
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    # The share of one CPU the gateway used over each window: a cell well under 100 % was
    # held back by the load generator (or the machine), not by the gateway.
    busy: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    skipped: str = ""

    def best(self, which: str) -> float | None:
        found = self.rps.get(which)
        return max(found) if found else None

    @property
    def ratio(self) -> float | None:
        hit, plain = self.best("hit"), self.best("uncached")
        return None if hit is None or not plain else hit / plain

    def busy_at_best(self, which: str) -> float | None:
        """The gateway's CPU share in the window of the best req/s."""
        rps, busy = self.rps.get(which, []), self.busy.get(which, [])
        return busy[rps.index(max(rps))] if rps and len(busy) == len(rps) else None

    def best_cpu(self, which: str) -> float | None:
        found = self.cpu_us.get(which)
        return min(found) if found else None

    @property
    def cpu_ratio(self) -> float | None:
        """Requests per CPU second of the gateway, HIT against uncached (best window each)."""
        hit, plain = self.best_cpu("hit"), self.best_cpu("uncached")
        return None if not hit or plain is None else plain / hit


def measure(
    *,
    start: Callable[..., Any],  # run.py's Processes.start(name, argv, env=...)
    pinned: Callable[[list[str]], list[str]],  # argv -> argv on the proxy's CPU
    wait_ready: Callable[[Any, str, float], None],
    run_load: Callable[[str, float], Any],  # (url, seconds) -> Cell with .rps and .errors
    cpu_of: Callable[[int], float],  # pid -> CPU seconds used so far
    free_ports: Callable[[int], list[int]],
    env: dict[str, str],
    upstream_url: str,
    out: Path,
    rounds: int,
    duration: float,
    warmup: float,
    startup_deadline: float,
) -> CacheRun:
    run = CacheRun()
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # every run starts cold
    gw_port, admin_port = free_ports(2)
    gateway = start(
        "gateway-cache",
        pinned([sys.executable, "-m", "gateway", "--config", str(BENCH / "routes.cache.yaml")]),
        env=dict(
            env,
            BENCH_LISTEN=f"{HOST}:{gw_port}",
            BENCH_ADMIN=f"{HOST}:{admin_port}",
            BENCH_UPSTREAM=upstream_url,
            BENCH_ACCESS_LOG=str(out / "gateway-cache-access.log"),
            BENCH_CACHE_DIR=str(cache_dir),
        ),
    )
    base = f"http://{HOST}:{gw_port}"
    bases = {"direct": upstream_url, "uncached": base, "hit": base}
    deadline = time.monotonic() + startup_deadline
    wait_ready(gateway, base + "/small", deadline)
    wait_ready(gateway, base + "/cached/small", deadline)
    with urllib.request.urlopen(base + "/cached/small", timeout=5) as answer:
        if answer.headers.get("X-Cache") != "HIT":
            run.skipped = f"the cached route answered X-Cache: {answer.headers.get('X-Cache')}"
            gateway.popen.terminate()
            gateway.popen.wait(timeout=15)
            return run
    seconds, warm = min(duration, SHORT_SECONDS), min(warmup, SHORT_WARMUP)
    for round_index in range(rounds):
        order = tuple(WHICH) if round_index % 2 == 0 else tuple(WHICH)[::-1]
        for which in order:
            url = bases[which] + WHICH[which]
            if warm > 0:
                run_load(url, warm)
            measured = which != "direct"  # direct: the gateway is idle, its CPU says nothing
            cpu_before = cpu_of(gateway.popen.pid) if measured else 0.0
            cell = run_load(url, seconds)
            cpu = cpu_of(gateway.popen.pid) - cpu_before if measured else 0.0
            run.rps.setdefault(which, []).append(cell.rps)
            shown = ""
            if measured and cell.requests:
                run.cpu_us.setdefault(which, []).append(cpu / cell.requests * 1e6)
                run.busy.setdefault(which, []).append(cpu / seconds)
                shown = (
                    f"  server {run.cpu_us[which][-1]:5.0f} µs CPU/req,"
                    f" {100 * cpu / seconds:3.0f}% of a CPU"
                )
            run.errors += cell.errors
            print(
                f"round {round_index + 1} cache {which:>9}: {cell.rps:10.0f} req/s{shown}"
                + (f"  ERRORS {cell.errors}" if cell.errors else ""),
                flush=True,
            )
    gateway.popen.terminate()
    gateway.popen.wait(timeout=15)
    return run


def section(run: CacheRun) -> list[str]:
    lines = [
        "## Response cache",
        "",
        "Small JSON GET answered from the cache (HIT) against the same URL forwarded by an",
        "uncached route of the same gateway process, and direct to the upstream; best round of",
        f"each, short mode ({SHORT_SECONDS:g} s per cell). CPU µs/req is the gateway process's own",
        "CPU (user + system, every thread) over the window, per request, best window: it holds",
        "up when other work shares the machine. Busy is the gateway's share of one CPU in the",
        "best req/s window: well under 100 %, that cell was held back by the load generator",
        "(one wrk thread on the shared load CPU), not by the gateway.",
        "",
    ]
    if run.skipped:
        return [*lines, f"Not measured: {run.skipped}.", ""]
    lines += [
        "| path | req/s | vs uncached | busy | CPU µs/req | per CPU second vs uncached |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    plain = run.best("uncached") or 0.0
    plain_cpu = run.best_cpu("uncached")
    for which in WHICH:
        best = run.best(which) or 0.0
        shown = f"{best / plain:.2f}x" if plain else "—"
        cpu = run.best_cpu(which)
        cpu_shown = "—" if cpu is None else f"{cpu:.0f}"
        per_cpu = "—" if cpu is None or plain_cpu is None or not cpu else f"{plain_cpu / cpu:.2f}x"
        busy = run.busy_at_best(which)
        busy_shown = "—" if busy is None else f"{100 * busy:.0f}%"
        lines.append(
            f"| {which} | {best:,.0f} | {shown} | {busy_shown} | {cpu_shown} | {per_cpu} |"
        )
    return [*lines, ""]


def verdicts(run: CacheRun) -> list[tuple[str, str, bool | None]]:
    budget = f"cache HIT small-GET req/s ≥ {BUDGET} x the uncached route's"
    ratio = run.ratio
    if ratio is None:
        return [(budget, run.skipped or "not measured", None)]
    cpu_ratio = run.cpu_ratio
    measured = f"{run.best('hit'):,.0f} vs {run.best('uncached'):,.0f} req/s = {ratio:.2f}x" + (
        "" if cpu_ratio is None else f" (per CPU second: {cpu_ratio:.2f}x)"
    )
    return [(budget, measured, ratio >= BUDGET and not run.errors)]
