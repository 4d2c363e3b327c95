"""The gateway beside its peers, in one run (issue 17): the minimal aiohttp proxy
(bench/baseline.py), the gateway with one worker and with `--workers 2`, and, when `node` and
`npm` are on PATH, npm's fast-gateway (installed into a temporary directory outside the repo,
run as a five-line proxy). Small JSON GET and 64 KiB GET, the same load generator and pinning
as bench/run.py: one-worker proxies on CPU 0, the load generator and the upstream on CPU 1;
the two workers are not pinned (they share both CPUs with the load). Prints req/s, CPU
µs/request (all of the proxy's processes) and the ratios; `--results FILE` writes them too.

    .venv/bin/python bench/peers.py --rounds 2 --duration 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import fastgateway
from run import (
    BENCH,
    HOST,
    LOAD_CPU,
    OUT,
    PROXY_CPU,
    ROOT,
    STARTUP_DEADLINE,
    TESTS,
    BenchError,
    Cell,
    LoadGen,
    Process,
    Processes,
    bench_token,
    can_pin,
    check_bodies,
    choose_loadgen,
    free_ports,
    machine_cpu,
    pinned,
    process_cpu,
    wait_ready,
)


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live children (a supervisor's workers)."""
    total = process_cpu(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(process_cpu(int(child)) for child in children)


def measure(loadgen: LoadGen, url: str, seconds: float, pid: int) -> Cell:
    before, machine = tree_cpu(pid), machine_cpu()
    started = time.monotonic()
    cell = loadgen.run(url, seconds)
    elapsed = time.monotonic() - started
    used = tree_cpu(pid) - before
    if cell.requests:
        cell.server_us = used / cell.requests * 1e6
    cell.other_cpu = max(machine_cpu() - machine - used, 0.0) / elapsed  # load included
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-fast-gateway", action="store_true", help="skip the npm cell")
    parser.add_argument("--results", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    pin = can_pin()
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})
    OUT.mkdir(parents=True, exist_ok=True)
    loadgen = choose_loadgen("auto", args.connections, pin)
    up, base, gw1, admin1, gw2, admin2, fgw = free_ports(7)
    upstream_url = f"http://{HOST}:{up}"
    env = dict(
        os.environ,
        BENCH_UPSTREAM=upstream_url,
        BENCH_ACCESS_LOG=str(OUT / "peers-access.log"),
        BENCH_JWT_KEY=str(OUT / "jwt-public.pem"),
        PYTHONPATH=str(ROOT),
    )
    bench_token(OUT / "jwt-public.pem")
    py = sys.executable
    config = str(BENCH / "routes.bench.yaml")
    processes = Processes()
    temp = Path(tempfile.mkdtemp(prefix="fast-gateway-"))
    try:
        started: dict[str, tuple[Process, str, str]] = {}

        def start(name: str, argv: list[str], port: int, e: dict[str, str] | None = None) -> None:
            started[name] = (processes.start(name, argv, e), f"http://{HOST}:{port}", "/small")

        start(
            "upstream",
            pinned(LOAD_CPU, [py, str(BENCH / "upstream.py"), "--listen", f"{HOST}:{up}"], pin),
            up,
        )
        start(
            "baseline",
            pinned(
                PROXY_CPU,
                [
                    py,
                    str(BENCH / "baseline.py"),
                    "--upstream",
                    upstream_url,
                    "--listen",
                    f"{HOST}:{base}",
                ],
                pin,
            ),
            base,
        )
        for name, port, admin, workers in (
            ("gateway", gw1, admin1, 1),
            ("gateway x2", gw2, admin2, 2),
        ):
            at = {"BENCH_LISTEN": f"{HOST}:{port}", "BENCH_ADMIN": f"{HOST}:{admin}"}
            argv = [
                py,
                "-m",
                "gateway",
                "--config",
                config,
                "--workers",
                str(workers),
                "--listen",
                at["BENCH_LISTEN"],
                "--admin",
                at["BENCH_ADMIN"],
            ]
            start(name, pinned(PROXY_CPU, argv, pin) if workers == 1 else argv, port, {**env, **at})
        script = None if args.no_fast_gateway else fastgateway.install(temp)
        if script is not None:
            start(
                fastgateway.NAME,
                pinned(PROXY_CPU, fastgateway.command(script, upstream_url, fgw), pin),
                fgw,
            )
        deadline = time.monotonic() + STARTUP_DEADLINE
        for process, url, ready in started.values():
            wait_ready(process, url + ready, deadline)
        targets = [name for name in started if name != "upstream"]
        for name in targets:
            check_bodies(started[name][1], name)
        cells: dict[tuple[str, str], list[Cell]] = {}
        for round_index in range(args.rounds):
            order = targets if round_index % 2 == 0 else targets[::-1]
            for test, (label, path) in TESTS.items():
                for name in order:
                    process, url, _ = started[name]
                    if args.warmup > 0:
                        loadgen.run(url + path, args.warmup)
                    cell = measure(loadgen, url + path, args.duration, process.popen.pid)
                    cells.setdefault((test, name), []).append(cell)
                    print(
                        f"round {round_index + 1} {label:>15} {name:>12}: {cell.rps:9.0f} req/s"
                        f"  {cell.server_us or 0:5.0f} µs CPU/req"
                        + (f"  ERRORS {cell.errors}" if cell.errors else ""),
                        flush=True,
                    )
        lines = table(cells, targets)
        print("\n".join(lines))
        if args.results is not None:
            args.results.write_text("\n".join(lines) + "\n")
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def table(cells: dict[tuple[str, str], list[Cell]], targets: list[str]) -> list[str]:
    lines = [
        "| test | proxy | req/s (best round) | ÷ baseline | CPU µs/req | baseline CPU ÷ this |"
        " req/s per round |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for test, (label, _) in TESTS.items():
        base = max(cells[(test, "baseline")], key=lambda c: c.rps)
        for name in targets:
            best = max(cells[(test, name)], key=lambda c: c.rps)
            cpu = min((c.server_us or 0) for c in cells[(test, name)])
            base_cpu = min((c.server_us or 0) for c in cells[(test, "baseline")])
            per_round = ", ".join(f"{c.rps:,.0f}" for c in cells[(test, name)])
            lines.append(
                f"| {label} | {name} | {best.rps:,.0f} | {best.rps / base.rps:.2f}x | {cpu:.0f} |"
                f" {base_cpu / cpu if cpu else 0:.2f}x | {per_round} |"
            )
    if ("small", "gateway x2") in cells:
        one = max(c.rps for c in cells[("small", "gateway")])
        two = max(c.rps for c in cells[("small", "gateway x2")])
        lines.append("")
        lines.append(f"--workers 2 scaling (small GET): {two:,.0f} / {one:,.0f} = {two / one:.2f}x")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
