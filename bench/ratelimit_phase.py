"""`make bench`'s rate-limit phase: the small GET through a rate-limited route (a limit that
never triggers) as a ratio to the same GET through an unlimited route of the same gateway
process, in the same run: once with the memory store, once on a private redis-server that
this phase starts on a free port (skipped, and said so, when redis-server is not installed).

bench/run.py calls `measure` after its main rounds and `section` / `verdicts` for its report;
the module keeps its own config (bench/routes.ratelimit.yaml) so run.py's routes stay as they
are.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import scrape

BENCH: Final = Path(__file__).resolve().parent
HOST: Final = "127.0.0.1"
# Budgets: limited small-GET req/s >= this share of the unlimited route's, per store.
BUDGETS: Final = {"memory": 0.9, "redis": 0.7}


@dataclass
class StoreRun:
    store: str  # "memory" | "redis"
    plain: list[float] = field(default_factory=list)  # req/s per round, unlimited route
    limited: list[float] = field(default_factory=list)  # req/s per round, limited route
    limited_errors: int = 0
    # Checks the store did not answer within store.timeout (admitted unchecked, without the
    # headers: cheaper), from the gateway's own counter: a figure to read beside the ratio.
    unchecked: int = 0
    # The gateway's CPU µs per request (user + sys, every thread) per window: the figure that
    # holds up when other work shares the machine, as req/s does not.
    plain_cpu_us: list[float] = field(default_factory=list)
    limited_cpu_us: list[float] = field(default_factory=list)
    skipped: str = ""  # why this store was not measured

    @property
    def ratio(self) -> float | None:
        if not self.plain or not self.limited:
            return None
        return max(self.limited) / max(self.plain)

    @property
    def cpu_ratio(self) -> float | None:
        """Requests per CPU second, limited against unlimited (best window of each)."""
        if not self.plain_cpu_us or not self.limited_cpu_us:
            return None
        return min(self.plain_cpu_us) / min(self.limited_cpu_us)


def measure(
    *,
    start: Callable[..., Any],  # run.py's Processes.start(name, argv, env=...)
    pinned: Callable[[list[str]], list[str]],  # argv -> argv on the proxy's CPU
    pinned_load: Callable[[list[str]], list[str]],  # argv -> argv on the load generator's CPU
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
) -> list[StoreRun]:
    runs: list[StoreRun] = []
    for store in ("memory", "redis"):
        run = StoreRun(store)
        runs.append(run)
        redis_url = ""
        if store == "redis":
            server = shutil.which("redis-server")
            if server is None:
                run.skipped = "redis-server is not installed (apt-get install redis-server)"
                continue
            (redis_port,) = free_ports(1)
            start(  # beside the upstream and the load generator, off the proxy's CPU
                "redis",
                pinned_load([server, "--port", str(redis_port), "--bind", HOST, "--save", "",
                 "--appendonly", "no"]),
            )  # fmt: skip
            _wait_redis(redis_port, time.monotonic() + startup_deadline)
            redis_url = f"redis://{HOST}:{redis_port}/0"
        gw_port, admin_port = free_ports(2)
        gateway = start(
            f"gateway-ratelimit-{store}",
            pinned([sys.executable, "-m", "gateway", "--config",
                    str(BENCH / "routes.ratelimit.yaml")]),
            env=dict(
                env,
                BENCH_LISTEN=f"{HOST}:{gw_port}",
                BENCH_ADMIN=f"{HOST}:{admin_port}",
                BENCH_UPSTREAM=upstream_url,
                BENCH_ACCESS_LOG=str(out / f"gateway-ratelimit-{store}-access.log"),
                BENCH_REDIS=redis_url,
            ),
        )  # fmt: skip
        base = f"http://{HOST}:{gw_port}"
        deadline = time.monotonic() + startup_deadline
        wait_ready(gateway, base + "/small", deadline)
        wait_ready(gateway, base + "/rl/small", deadline)
        for round_index in range(rounds):
            order = ("plain", "limited") if round_index % 2 == 0 else ("limited", "plain")
            for which in order:
                url = base + ("/small" if which == "plain" else "/rl/small")
                if warmup > 0:
                    run_load(url, warmup)
                admin = f"http://{HOST}:{admin_port}/metrics"
                unchecked_before = _store_errors(admin)
                cpu_before = cpu_of(gateway.popen.pid)
                cell = run_load(url, duration)
                cpu = cpu_of(gateway.popen.pid) - cpu_before
                unchecked = _store_errors(admin) - unchecked_before
                run.unchecked += unchecked
                getattr(run, which).append(cell.rps)
                cpu_us = cpu / cell.requests * 1e6 if cell.requests else 0.0
                if cell.requests:
                    getattr(run, f"{which}_cpu_us").append(cpu_us)
                if which == "limited":
                    run.limited_errors += cell.errors
                print(
                    f"round {round_index + 1} rate limit {store:>6} {which:>8}: "
                    f"{cell.rps:10.0f} req/s  server {cpu_us:5.0f} µs CPU/req"
                    + (f"  ERRORS {cell.errors}" if cell.errors else "")
                    + (f"  unchecked {unchecked}" if unchecked else ""),
                    flush=True,
                )
        gateway.popen.terminate()
        gateway.popen.wait(timeout=15)
    return runs


def _store_errors(metrics_url: str) -> int:
    """The gateway's count of checks its store did not answer in time, from /metrics."""
    return int(scrape.totals(metrics_url)["gateway_rate_limit_store_errors_total"])


def _wait_redis(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)  # polling interval, not a settle time
    raise RuntimeError(f"redis-server not ready on port {port}")


def section(runs: list[StoreRun]) -> list[str]:
    lines = [
        "## Rate limits",
        "",
        "Small JSON GET through a rate-limited route (limit never reached) against the same",
        "GET through an unlimited route of the same gateway process, best round of each.",
        "The CPU columns are the gateway process's own CPU (user + sys, every thread) per",
        "request, best window of each: unlike req/s, they hold up when other work shares the",
        "machine.",
        "",
        "| store | unlimited req/s | limited req/s | ratio | unlimited CPU µs/req "
        "| limited CPU µs/req | CPU ratio | budget |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        if run.skipped:
            lines.append(f"| {run.store} | — | — | — | — | — | — | not measured: {run.skipped} |")
            continue
        ratio, cpu_ratio = run.ratio, run.cpu_ratio
        shown = "—" if ratio is None else f"{ratio:.2f}x"
        cpu_shown = "—" if cpu_ratio is None else f"{cpu_ratio:.2f}x"
        lines.append(
            f"| {run.store} | {max(run.plain, default=0):,.0f} | {max(run.limited, default=0):,.0f}"
            f" | {shown} | {min(run.plain_cpu_us, default=0):.0f}"
            f" | {min(run.limited_cpu_us, default=0):.0f} | {cpu_shown}"
            f" | ≥ {BUDGETS[run.store]}x |"
        )
    unchecked = [f"{run.store} {run.unchecked:,}" for run in runs if not run.skipped]
    lines += [
        "",
        "Checks the store did not answer within store.timeout (admitted unchecked, no headers), "
        "over every window: " + (", ".join(unchecked) or "—") + ".",
    ]
    return [*lines, ""]


def verdicts(runs: list[StoreRun]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    for run in runs:
        budget = (
            f"rate-limited ({run.store} store) small-GET req/s ≥ {BUDGETS[run.store]} x unlimited"
        )
        ratio = run.ratio
        if ratio is None:
            out.append((budget, run.skipped or "not measured", None))
            continue
        cpu_ratio = run.cpu_ratio
        measured = f"{max(run.limited):,.0f} vs {max(run.plain):,.0f} req/s = {ratio:.2f}x" + (
            "" if cpu_ratio is None else f" (per CPU second: {cpu_ratio:.2f}x)"
        )
        out.append((budget, measured, ratio >= BUDGETS[run.store] and not run.limited_errors))
    return out
