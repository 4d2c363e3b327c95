"""`make bench`'s tracing phase: the small GET through a gateway with `tracing:` at
sample_ratio 1.0 and at 0.01, as ratios to the same gateway without tracing, exporting to a
local dummy OTLP/HTTP collector (this file, run with `--collector PORT`: an aiohttp app that
accepts POST /v1/traces, counts its spans and discards them) that the phase starts beside the
load generator.

A traced gateway encodes and sends its spans from a child process (gateway/ops/spanexport.py),
which inherits the gateway's CPU. For "0.01" and "1.0" the phase moves that export process to
the collector's CPU, as a deployment puts a collector agent beside the app: the gateway's CPU
is left to requests, and the export process's own CPU per request is measured and shown next
to the gateway's. "1.0 shared" is the same gateway with its export process left on the
gateway's CPU (a host with no spare CPU): no budget, there to show what the move buys and
what the export process's lower priority sheds.

The upstream is bench/cannedupstream.py (the same bytes as bench/upstream.py's /small, at a
fifth of its CPU), started here on the load generator's CPU: with the aiohttp upstream, wrk,
the collector and the export process on that CPU, it was full before the gateway's was, and
the phase measured the load side. Spans the gateways dropped are read from their /metrics
and shown; a budget counts only when its gateway dropped (almost) none.

Four gateway processes, one per setting (tracing is fixed at start), one at a time on the
proxy's CPU, their windows interleaved over rounds; the best round of each is kept. The config
of each is written to bench/out/ from TEMPLATE. bench/run.py calls `measure` after the
rate-limit phase (or alone, with `--only tracing`) and `section` / `verdicts` for its report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import scrape

HOST: Final = "127.0.0.1"
SETTINGS: Final = ("off", "0.01", "1.0", "1.0 shared")  # off, then the two sample ratios
RATIOS: Final = {"0.01": "0.01", "1.0": "1.0", "1.0 shared": "1.0"}
MOVED: Final = frozenset({"0.01", "1.0"})  # export process beside the collector
EXPORT_MODULE: Final = b"gateway.ops.spanexport"  # in the export process's command line
# Budgets: traced small-GET req/s >= this share of the untraced gateway's.
BUDGETS: Final = {"0.01": 0.97, "1.0": 0.8}
MAX_DROPPED: Final = 0.01  # share of a budgeted setting's spans it may drop and still count
BENCH: Final = Path(__file__).resolve().parent
TEMPLATE: Final = """\
# Written by bench/tracing_phase.py: one catch-all route to the bench upstream.
version: 1
listen: {listen}
admin: {admin}
access_log: {access_log}
services:
  up:
    targets: ["{upstream}"]
    timeouts: {{connect: 2s, read: 60s}}
routes:
  - {{prefix: /, service: up}}
{tracing}"""


@dataclass
class TracingRun:
    rps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETTINGS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETTINGS, 0))
    # The gateway's CPU µs per request (all threads: the export thread too), per window: the
    # figure that holds up when other work shares the machine.
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETTINGS})
    # The export process's CPU µs per request, the same windows (0 for "off"; None for a
    # window in which it was restarted).
    export_us: dict[str, list[float | None]] = field(
        default_factory=lambda: {s: [] for s in SETTINGS}
    )
    spans: int = 0  # spans the dummy collector received (sampled ones got there)
    # Per setting, from its gateway's /metrics at the end: spans dropped, requests answered.
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETTINGS, 0))
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETTINGS, 0))

    def dropped_share(self, setting: str) -> float:
        """Dropped spans per span recorded (a traced small GET is two spans)."""
        return self.dropped[setting] / max(1, 2 * self.requests[setting])

    def ratio(self, setting: str) -> float | None:
        if not self.rps["off"] or not self.rps[setting]:
            return None
        return max(self.rps[setting]) / max(self.rps["off"])

    def cpu_ratio(self, setting: str) -> float | None:
        """Requests per CPU second, traced against off (best window of each)."""
        if not self.cpu_us["off"] or not self.cpu_us[setting]:
            return None
        return min(self.cpu_us["off"]) / min(self.cpu_us[setting])

    def both_us(self, setting: str) -> float | None:
        """Gateway and export process together, µs CPU per request (best window)."""
        pairs = zip(self.cpu_us[setting], self.export_us[setting], strict=True)
        return min((g + e for g, e in pairs if e is not None), default=None)


def export_process(gateway_pid: int, deadline: float) -> int | None:
    """The pid of `gateway_pid`'s export child, once it runs (None past `deadline`)."""
    while True:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
                if ppid != gateway_pid:
                    continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    if EXPORT_MODULE in cmdline.read():
                        return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)  # polling interval: the gateway starts it at once, it takes a moment


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
    out: Path,
    rounds: int,
    duration: float,
    warmup: float,
    startup_deadline: float,
) -> TracingRun:
    run = TracingRun()
    collector_port, canned_port = free_ports(2)
    collector_url = f"http://{HOST}:{collector_port}"
    collector = start(
        "collector", pinned_load([sys.executable, __file__, "--collector", str(collector_port)])
    )
    wait_ready(collector, collector_url + "/spans", time.monotonic() + startup_deadline)
    upstream_url = f"http://{HOST}:{canned_port}"
    canned = start(
        "canned-upstream",
        pinned_load(
            [sys.executable, str(BENCH / "cannedupstream.py"), "--listen", f"{HOST}:{canned_port}"]
        ),
    )
    wait_ready(canned, upstream_url + "/small", time.monotonic() + startup_deadline)
    bases: dict[str, str] = {}
    admins: dict[str, str] = {}
    pids: dict[str, int] = {}
    for setting in SETTINGS:
        gw_port, admin_port = free_ports(2)
        tracing = (
            ""
            if setting == "off"
            else f'tracing: {{otlp_endpoint: "http://{HOST}:{collector_port}", '
            f"sample_ratio: {RATIOS[setting]}}}\n"
        )
        label = setting.replace(" ", "-")
        config = out / f"routes.tracing-{label}.yaml"
        config.write_text(
            TEMPLATE.format(
                listen=f"{HOST}:{gw_port}",
                admin=f"{HOST}:{admin_port}",
                access_log=out / f"gateway-tracing-{label}-access.log",
                upstream=upstream_url,
                tracing=tracing,
            )
        )
        name = f"gateway-tracing-{label}"
        gateway = start(name, pinned([sys.executable, "-m", "gateway", "--config", str(config)]),
                        env=env)  # fmt: skip
        bases[setting] = f"http://{HOST}:{gw_port}"
        admins[setting] = f"http://{HOST}:{admin_port}"
        pids[setting] = gateway.popen.pid
        wait_ready(gateway, bases[setting] + "/small", time.monotonic() + startup_deadline)
    collector_cpus = os.sched_getaffinity(collector.popen.pid)
    # All four stay up (idle, they use next to no CPU); the warm-up of each window also lets
    # the previous one's last export finish.
    for round_index in range(rounds):
        order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]
        for setting in order:
            url = bases[setting] + "/small"
            exporter = None
            if setting != "off":  # found again each window: it may have been restarted
                exporter = export_process(pids[setting], time.monotonic() + startup_deadline)
                if exporter is None:
                    raise RuntimeError(f"gateway-tracing {setting}: no export process")
                if setting in MOVED:  # before the warm-up, whose spans count too
                    os.sched_setaffinity(exporter, collector_cpus)
            if warmup > 0:
                run_load(url, warmup)
            cpu_before = cpu_of(pids[setting])
            export_before = 0.0 if exporter is None else cpu_of(exporter)
            cell = run_load(url, duration)
            cpu = cpu_of(pids[setting]) - cpu_before
            export_cpu: float | None = 0.0
            if exporter is not None:
                same = export_process(pids[setting], time.monotonic()) == exporter
                export_cpu = cpu_of(exporter) - export_before if same else None
            run.rps[setting].append(cell.rps)
            if cell.requests:
                run.cpu_us[setting].append(cpu / cell.requests * 1e6)
                run.export_us[setting].append(
                    None if export_cpu is None else export_cpu / cell.requests * 1e6
                )
            run.errors[setting] += cell.errors
            shown = run.export_us[setting][-1] if cell.requests else 0.0
            print(
                f"round {round_index + 1} tracing {setting:>10}: {cell.rps:10.0f} req/s"
                f"  server {run.cpu_us[setting][-1] if cell.requests else 0:5.0f} µs CPU/req"
                f"  export process {'restarted' if shown is None else f'{shown:5.0f}'}"
                + (f"  ERRORS {cell.errors}" if cell.errors else ""),
                flush=True,
            )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the last batches (sent once a second) are in
        with urllib.request.urlopen(collector_url + "/spans", timeout=2) as response:
            spans = int(response.read())
        if spans and spans == run.spans:
            break
        run.spans = spans
        time.sleep(1.2)  # polling interval: the gateways send at least once a second
    for setting, admin in admins.items():
        run.dropped[setting], run.requests[setting] = counted(admin)
    return run


def counted(admin: str) -> tuple[int, int]:
    """A gateway's spans dropped and requests answered, from its /metrics."""
    sums = scrape.totals(admin + "/metrics")
    return int(sums["gateway_trace_spans_dropped_total"]), int(sums["gateway_requests_total"])


def section(run: TracingRun | None) -> list[str]:
    if run is None:
        return []
    lines = [
        "## Tracing",
        "",
        "Small JSON GET through a gateway exporting OpenTelemetry spans (OTLP/HTTP, to a local",
        "dummy collector that discards them) against the same gateway without `tracing:`,",
        f"best round of each. Spans the collector received: {run.spans:,}.",
        "",
        "The gateway hands its spans to an export process of its own (the SDK's OTLP exporter",
        "runs there). For sample_ratio 0.01 and 1.0 the bench moves that process to the",
        "collector's CPU (the load generator's), as a collector agent beside the app; for",
        '"1.0, export shared" it stays on the gateway\'s CPU. CPU columns, best window: the',
        "gateway's own CPU per request (every thread), the export process's, and both.",
        "The upstream is bench/cannedupstream.py, so that the load generator's CPU has room",
        "for the export process; spans dropped are the gateways' own count, over every window.",
        "",
        "| tracing | req/s | ratio to off | gateway CPU µs/req | CPU ratio to off "
        "| export process CPU µs/req | both µs/req | spans dropped | budget |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for setting in SETTINGS:
        best = max(run.rps[setting], default=0.0)
        ratio = run.ratio(setting)
        shown = "—" if setting == "off" or ratio is None else f"{ratio:.2f}x"
        budget = f"≥ {BUDGETS[setting]}x" if setting in BUDGETS else "—"
        label = {
            "off": "off",
            "1.0 shared": "sample_ratio 1.0, export shared",
        }.get(setting, f"sample_ratio {setting}")
        cpu = min(run.cpu_us[setting], default=0.0)
        cpu_ratio = run.cpu_ratio(setting)
        cpu_shown = "—" if setting == "off" or cpu_ratio is None else f"{cpu_ratio:.2f}x"
        exported = [e for e in run.export_us[setting] if e is not None]
        export = "—" if setting == "off" or not exported else f"{min(exported):.0f}"
        both = run.both_us(setting)
        both_shown = "—" if both is None else f"{both:.0f}"
        dropped = (
            "—"
            if setting == "off"
            else f"{run.dropped[setting]:,} ({100 * run.dropped_share(setting):.1f}%)"
        )
        lines.append(
            f"| {label} | {best:,.0f} | {shown} | {cpu:.0f} | {cpu_shown} | {export} "
            f"| {both_shown} | {dropped} | {budget} |"
        )
    return [*lines, ""]


def verdicts(run: TracingRun | None) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    for setting, budget in BUDGETS.items():
        label = f"traced (sample_ratio {setting}) small-GET req/s ≥ {budget} x tracing off"
        ratio = None if run is None else run.ratio(setting)
        if run is None or ratio is None:
            out.append((label, "not measured", None))
            continue
        cpu_ratio = run.cpu_ratio(setting)
        share = run.dropped_share(setting)
        measured = (
            f"{max(run.rps[setting]):,.0f} vs {max(run.rps['off']):,.0f} req/s = {ratio:.2f}x"
            + ("" if cpu_ratio is None else f" (per CPU second: {cpu_ratio:.2f}x)")
            + f", {100 * share:.1f}% of spans dropped"
        )
        kept = share <= MAX_DROPPED
        out.append((label, measured, ratio >= budget and kept and not run.errors[setting]))
    return out


def collector_main(port: int) -> None:
    """The dummy collector: accept every export, count its spans, keep nothing else."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    total = 0
    reply = ExportTraceServiceResponse().SerializeToString()

    async def export(request: web.Request) -> web.Response:
        nonlocal total
        body = ExportTraceServiceRequest.FromString(await request.read())
        total += sum(len(s.spans) for r in body.resource_spans for s in r.scope_spans)
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def spans(request: web.Request) -> web.Response:
        return web.Response(text=str(total))

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/traces", export)
    app.router.add_get("/spans", spans)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the tracing phase's dummy OTLP collector")
    parser.add_argument("--collector", type=int, required=True, help="port to listen on")
    arguments = parser.parse_args()
    collector_main(arguments.collector)
