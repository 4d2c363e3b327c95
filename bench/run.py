"""`make bench`: the gateway against a minimal aiohttp proxy and against no proxy at all.

One run starts a fast upstream (bench/upstream.py), the baseline proxy (bench/baseline.py)
and the gateway (bench/routes.bench.yaml, JSON access log on, written to bench/out/), then:

1. drives direct-to-upstream, baseline and gateway with the same load generator (wrk when on
   PATH, else bench/loadgen.py) for a small JSON GET and a 64 KiB GET: a warm-up, then one
   measured window per cell, targets interleaved over rounds (order reversed every other
   round); the best round by req/s is kept, with that round's p50/p99;
2. streams 1 GiB up (POST, chunked) and 1 GiB down through each, with an aiohttp client here,
   for MB/s (best round) and the proxy's peak RSS (VmHWM after a reset, and sampled VmRSS;
   worst round);
3. last, holds 500 slowloris and 200 non-reading clients (bench/hostile.py) open on the
   gateway's port, re-opening those it closes, while the small GET runs against it, interleaved
   over rounds with windows without them: req/s as a ratio of those, and the gateway's peak RSS;
4. prints the tables and the budgets' verdicts, and writes them to bench/RESULTS.md.

The proxy under test runs on CPU 0; the load generator, the upstream and this script (with the
hostile clients) on CPU 1 (taskset), when there are two CPUs. The budgets are not tests: the
exit status is 0 whatever they say, non-zero only when the bench itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, TypeVar

import aiohttp
import cache_phase
import compose_phase
import fastgateway
import ratelimit_phase
import tracing_phase
import workers_phase
from hostile import RCVBUF, STREAM_BYTES, TRICKLE_BYTES, TRICKLE_EVERY, Hostile, Report
from hostile import TICK as HOSTILE_TICK

T = TypeVar("T")

BENCH: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH.parent
OUT: Final = BENCH / "out"
RESULTS: Final = BENCH / "RESULTS.md"
HOST: Final = "127.0.0.1"
PROXY_CPU: Final = 0
LOAD_CPU: Final = 1
MIB: Final = 2**20
CHUNK: Final = 2**18  # the transfers' write and read size
TARGETS: Final = ("direct", "baseline", "gateway")
PEER: Final = fastgateway.NAME  # npm's fast-gateway: request/response cells only, when installed
PROXIES: Final = frozenset({"gateway", PEER})  # shown as a ratio to the baseline
TESTS: Final = {"small": ("small JSON GET", "/small"), "64k": ("64 KiB GET", "/64k")}
STARTUP_DEADLINE: Final = 20.0  # seconds for a process to accept connections
# Budgets: gateway small-GET req/s >= 0.9 x baseline; peak RSS < 100 MiB; MB/s >= 0.8 x baseline.
RPS_BUDGET: Final = 0.9
RSS_BUDGET_MIB: Final = 100.0
MBPS_BUDGET: Final = 0.8
# Issue 17: small GET >= 1.8 x baseline and >= npm fast-gateway; 64 KiB GET >= 1.6 x baseline.
LEAN_BUDGETS: Final = {"small": 1.8, "64k": 1.6}
# Hostile phase: small-GET req/s with the hostile clients held open >= 0.9 x without them (same
# phase, interleaved); the gateway's peak RSS meanwhile < 150 MiB.
HOSTILE_RPS_BUDGET: Final = 0.9
HOSTILE_RSS_BUDGET_MIB: Final = 150.0
HOSTILE_RSS_ABORT_MIB: Final = 2048.0  # the hostile clients let go if the gateway grows this big
HOSTILE_RUNS: Final = ("calm", "hostile")
# Auth phase: the small GET through the same route behind auth, as a ratio of it without.
AUTH_BUDGETS: Final = {"jwt": 0.75, "api_key": 0.85}  # RS256 JWT, API key
AUTH_PATHS: Final = {"none": "/small", "jwt": "/jwt/small", "api_key": "/key/small"}
BENCH_API_KEY: Final = "bench-api-key"  # its hash is in routes.bench.yaml
QUIET_CPU: Final = 0.2  # the gateway's CPU share below which the non-readers' responses stalled
SETTLE_DEADLINE: Final = 20.0  # seconds for the gateway to quieten / drop the hostile sockets
NOISY_CPU: Final = 0.10  # other processes using more than this share of a CPU: a noisy run


class BenchError(RuntimeError):
    """The bench itself could not run (a process did not start, a response was wrong)."""


# --- processes ------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct ephemeral ports, free when this returns."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def can_pin() -> bool:
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


def pinned(cpu: int, argv: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if pin else argv


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Every subprocess of the run, stopped by `stop_all` (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.running: list[Process] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        log = OUT / f"{name}.log"
        with log.open("wb") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        process = Process(name, popen, log)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        self.stop(*reversed(self.running))
        self.running.clear()

    @staticmethod
    def stop(*processes: Process) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        for process in processes:
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in processes:
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()


def wait_ready(process: Process, url: str, deadline: float) -> None:
    """Poll `url` until it answers 200, the process exits, or the deadline passes."""
    last = ""
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise BenchError(
                f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.05)  # polling interval, not a settle time
    raise BenchError(f"{process.name} not ready at {url} in time ({last}):\n{process.tail()}")


def check_bodies(base: str, name: str) -> None:
    """Each target must answer the test paths correctly before it is measured."""
    for path, length in (("/small", None), ("/64k", 65536), ("/stream?bytes=1000000", 1000000)):
        with urllib.request.urlopen(base + path, timeout=5) as response:
            body = response.read()
        if response.status != 200 or (length is not None and len(body) != length):
            raise BenchError(f"{name}: GET {path} -> {response.status}, {len(body)} bytes")
        if path == "/small" and not isinstance(json.loads(body), dict):
            raise BenchError(f"{name}: GET /small is not a JSON object")


# --- load generators ------------------------------------------------------------------------


@dataclass
class Cell:
    """One measured window of one test against one target."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_us: float | None = None  # CPU time of the process answering, per request
    other_cpu: float | None = None  # CPU used by processes not in this bench, in CPUs (0..n)


_UNITS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"unreadable wrk latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str) -> Cell:
    """Requests/sec, the 50% and 99% lines of --latency, and any errors wrk counted."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if rps is None or p50 is None or p99 is None or total is None:
        raise BenchError(f"unreadable wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx[1])
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Cell(float(rps[1]), wrk_ms(p50[1]), wrk_ms(p99[1]), int(total[1]), errors)


@dataclass
class LoadGen:
    kind: str  # "wrk" | "python"
    description: str
    connections: int
    pin: bool

    def command(self, url: str, seconds: float, headers: tuple[str, ...] = ()) -> list[str]:
        if self.kind == "wrk":
            whole = max(1, math.ceil(seconds))  # wrk takes whole seconds only
            argv = ["wrk", "-t1", f"-c{self.connections}", f"-d{whole}s", "--latency", url]
            argv += [arg for header in headers for arg in ("-H", header)]
        else:
            argv = [sys.executable, str(BENCH / "loadgen.py"), "--url", url]
            argv += ["--connections", str(self.connections), "--duration", f"{seconds:g}"]
            argv += [arg for header in headers for arg in ("--header", header)]
        return pinned(LOAD_CPU, argv, self.pin)

    def run(self, url: str, seconds: float, headers: tuple[str, ...] = ()) -> Cell:
        done = subprocess.run(
            self.command(url, seconds, headers),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        return self.result(done.returncode, done.stdout, done.stderr)

    async def run_async(self, url: str, seconds: float) -> Cell:
        """`run` without blocking the event loop (the hostile clients share it)."""
        command = self.command(url, seconds)
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(seconds + 60):
                stdout, stderr = await child.communicate()
        except TimeoutError:
            child.kill()
            await child.wait()
            raise BenchError(f"load generator did not finish: {command}") from None
        return self.result(child.returncode or 0, stdout.decode(), stderr.decode())

    def result(self, returncode: int, stdout: str, stderr: str) -> Cell:
        if returncode != 0:
            output = (stderr or stdout).strip()
            raise BenchError(f"load generator failed ({returncode}):\n{output}")
        if self.kind == "wrk":
            return parse_wrk(stdout)
        data = json.loads(stdout)
        return Cell(
            data["rps"], data["p50_ms"], data["p99_ms"], int(data["requests"]), int(data["errors"])
        )


def find_wrk(allow_install: bool) -> str | None:
    """wrk's path; when missing and we are root, one `apt-get install -y wrk` attempt."""
    if shutil.which("wrk"):
        return shutil.which("wrk")
    if not allow_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    print("wrk is not installed: trying `apt-get install -y wrk` once ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    script = "apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)"
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(["sh", "-c", script], env=env, timeout=300, check=False, capture_output=True)
    return shutil.which("wrk")


def choose_loadgen(kind: str, connections: int, pin: bool) -> LoadGen:
    if kind in ("auto", "wrk"):
        wrk = find_wrk(allow_install=True)
        if wrk is not None:
            version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
            first = (version.stdout + version.stderr).strip().splitlines()[:1]
            label = first[0] if first else "wrk"
            return LoadGen("wrk", f"wrk ({label})", connections, pin)
        if kind == "wrk":
            raise BenchError("wrk was asked for and is not installed")
        print("wrk unavailable: falling back to the Python load generator", flush=True)
    desc = "bench/loadgen.py (Python aiohttp closed-loop client; wrk was not available)"
    return LoadGen("python", desc, connections, pin)


# --- CPU accounting -------------------------------------------------------------------------

TICK: Final = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, all threads) used so far by `pid`; 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def machine_cpu() -> float:
    """Seconds of user + system CPU used by every process on the machine so far."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / TICK  # user, nice, system


def own_cpu(pids: list[int]) -> float:
    """CPU seconds of this bench: its servers, this process and its finished children (wrk)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(process_cpu(pid) for pid in pids) + sum(u.ru_utime + u.ru_stime for u in usage)


@dataclass
class CpuWindow:
    """CPU used during one measured window: by the server under test, and by outsiders."""

    pids: list[int]
    server: int | None
    started: float = field(default_factory=time.monotonic)
    machine: float = field(default_factory=machine_cpu)
    ours: float = 0.0
    server_cpu: float = 0.0

    def __post_init__(self) -> None:
        self.ours = own_cpu(self.pids)
        self.server_cpu = process_cpu(self.server) if self.server else 0.0

    def close(self, cell: Cell) -> Cell:
        seconds = time.monotonic() - self.started
        others = (machine_cpu() - self.machine) - (own_cpu(self.pids) - self.ours)
        cell.other_cpu = max(others, 0.0) / seconds
        if self.server and cell.requests:
            cell.server_us = (process_cpu(self.server) - self.server_cpu) / cell.requests * 1e6
        return cell


# --- 1 GiB transfers ------------------------------------------------------------------------


@dataclass
class Transfer:
    mb_s: float
    seconds: float
    rss_before_mib: float | None  # the proxy's RSS before the transfer; None for direct
    rss_peak_mib: float | None
    server_cpu_s: float  # CPU seconds of the process answering (proxy, or upstream), per GiB


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match[1]) if match else None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0): the peak is then this transfer's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextlib.asynccontextmanager
async def rss_watch(pid: int | None) -> AsyncIterator[list[float]]:
    """Yields [before, peak] in MiB, filled in on exit: max of sampled VmRSS and VmHWM."""
    result: list[float] = []
    if pid is None:
        yield result
        return
    reset = reset_peak_rss(pid)
    before = proc_status_kib(pid, "VmRSS") or 0
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, proc_status_kib(pid, "VmRSS") or 0)
            await asyncio.sleep(0.02)

    task = asyncio.get_running_loop().create_task(sample())
    try:
        yield result
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        hwm = proc_status_kib(pid, "VmHWM") if reset else None
        peak = max(peak, hwm or 0, proc_status_kib(pid, "VmRSS") or 0)
        result.extend([before / 1024, peak / 1024])


async def upload(session: aiohttp.ClientSession, url: str, total: int) -> None:
    block = b"u" * CHUNK

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            size = min(CHUNK, total - sent)
            yield block if size == CHUNK else block[:size]
            sent += size

    async with session.post(url, data=body()) as response:
        answer = await response.json()
    if response.status != 200 or answer.get("bytes") != total:
        raise BenchError(f"upload via {url}: HTTP {response.status}, upstream saw {answer}")


async def download(session: aiohttp.ClientSession, url: str, total: int) -> None:
    received = 0
    async with session.get(url) as response:
        async for chunk in response.content.iter_chunked(CHUNK):
            received += len(chunk)
    if response.status != 200 or received != total:
        raise BenchError(f"download via {url}: HTTP {response.status}, {received} bytes")


async def transfer(
    base: str, direction: str, total: int, rss_pid: int | None, cpu_pid: int
) -> Transfer:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, read_bufsize=CHUNK)
    async with session, rss_watch(rss_pid) as rss:
        cpu = process_cpu(cpu_pid)
        started = time.perf_counter()
        if direction == "upload":
            await upload(session, base + "/sink", total)
        else:
            await download(session, f"{base}/stream?bytes={total}", total)
        seconds = time.perf_counter() - started
        cpu = (process_cpu(cpu_pid) - cpu) * MIB * 1024 / total
    before, peak = (rss[0], rss[1]) if rss else (None, None)
    return Transfer(total / seconds / 1e6, seconds, before, peak, cpu)


def run_on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """Run the client on uvloop when it is installed, like the processes it measures."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# --- hostile clients ------------------------------------------------------------------------


@dataclass
class HostileRun:
    """One measured window of the gateway's small GET with the hostile clients held open."""

    cell: Cell
    report: Report
    rss_before_mib: float
    rss_peak_mib: float
    quiet_seconds: float  # from the clients' entry until the gateway quietened
    capped: bool  # the gateway outgrew HOSTILE_RSS_ABORT_MIB: the clients let go early


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def until_quiet(pid: int) -> float:
    """Wait until `pid` uses under QUIET_CPU of a CPU (at most SETTLE_DEADLINE); seconds."""
    started = time.monotonic()
    previous = process_cpu(pid)
    while time.monotonic() - started < SETTLE_DEADLINE:
        await asyncio.sleep(0.25)  # the measuring window
        now = process_cpu(pid)
        if now - previous < QUIET_CPU * 0.25:
            break
        previous = now
    return time.monotonic() - started


async def hostile_window(
    loadgen: LoadGen, url: str, port: int, gw_pid: int, pids: list[int], args: argparse.Namespace
) -> HostileRun:
    """Open the hostile clients, let the gateway quieten, then warm-up and one measured window.

    The non-readers' responses first fill every buffer between the upstream and them (some
    MiB each); the window measures the held state after that, not the fill.
    """
    lifetime = SETTLE_DEADLINE + args.warmup + args.duration + 60  # a bound, not a schedule
    capped = False
    async with (
        rss_watch(gw_pid) as rss,
        Hostile(port, args.hostile_slowloris, args.hostile_non_readers, lifetime) as hostile,
    ):

        async def cap() -> None:
            nonlocal capped
            while True:
                if (proc_status_kib(gw_pid, "VmRSS") or 0) >= HOSTILE_RSS_ABORT_MIB * 1024:
                    capped = True
                    hostile.stop()
                    return
                await asyncio.sleep(0.1)  # sampling interval

        guard = asyncio.get_running_loop().create_task(cap())
        try:
            quiet = await until_quiet(gw_pid)
            if args.warmup > 0:
                await loadgen.run_async(url, args.warmup)
            window = CpuWindow(pids, gw_pid)
            cell = window.close(await loadgen.run_async(url, args.duration))
        finally:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
    return HostileRun(cell, hostile.report, rss[0], rss[1], quiet, capped)


def settle(pid: int, fds_before: int) -> bool:
    """Wait until the gateway has dropped the hostile sockets (its fd count is back)."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while time.monotonic() < deadline:
        if open_fds(pid) <= fds_before + 16:
            return True
        time.sleep(0.05)  # polling interval, not a settle time
    return False


def hostile_phase(
    results: Results,
    loadgen: LoadGen,
    url: str,
    port: int,
    gw_pid: int,
    pids: list[int],
    args: argparse.Namespace,
) -> None:
    """Small GET against the gateway without and with the hostile clients, interleaved."""
    for round_index in range(args.rounds):
        for run in HOSTILE_RUNS if round_index % 2 == 0 else HOSTILE_RUNS[::-1]:
            if run == "calm":
                if args.warmup > 0:
                    loadgen.run(url, args.warmup)
                window = CpuWindow(pids, gw_pid)
                cell = window.close(loadgen.run(url, args.duration))
                results.hostile_calm.append(cell)
                extra = ""
            else:
                fds = open_fds(gw_pid)
                held = run_on_uvloop(hostile_window(loadgen, url, port, gw_pid, pids, args))
                results.hostile_runs.append(held)
                cell, report = held.cell, held.report
                extra = (
                    f"  peak RSS {held.rss_peak_mib:6.1f} MiB  held at end "
                    f"{report.open_at_end['slowloris']}/{report.open_at_end['non_reader']}"
                    f"  re-opened {report.reconnects['slowloris']}/"
                    f"{report.reconnects['non_reader']}"
                )
                if not settle(gw_pid, fds):
                    extra += f"  (gateway still had {open_fds(gw_pid)} fds, {fds} before)"
            print(
                f"round {round_index + 1} hostile phase {run:>8}: {cell.rps:10.0f} req/s"
                f"  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms"
                f"  server {cell.server_us or 0:5.0f} µs CPU/req{extra}"
                + (f"  ERRORS {cell.errors}" if cell.errors else ""),
                flush=True,
            )


# --- the run --------------------------------------------------------------------------------


@dataclass
class Results:
    loadgen: LoadGen
    pin: bool
    rounds: int
    duration: float
    warmup: float
    transfer_bytes: int
    cells: dict[tuple[str, str], list[Cell]] = field(default_factory=dict)
    targets: tuple[str, ...] = TARGETS  # of the request/response cells: PEER too when it ran
    peer_note: str = ""  # why PEER did not run, when it did not
    transfers: dict[tuple[str, str], list[Transfer]] = field(default_factory=dict)
    hostile_calm: list[Cell] = field(default_factory=list)
    hostile_runs: list[HostileRun] = field(default_factory=list)
    auth_cells: dict[str, list[Cell]] = field(default_factory=dict)  # "none" | "jwt" | "api_key"
    hostile_slowloris: int = 0
    hostile_non_readers: int = 0
    rate_limits: list[ratelimit_phase.StoreRun] = field(default_factory=list)
    cache: cache_phase.CacheRun = field(default_factory=cache_phase.CacheRun)
    workers: workers_phase.WorkersRun | None = None  # --workers 2 against one worker
    tracing: tracing_phase.TracingRun | None = None
    compose: dict[str, compose_phase.Way] = field(default_factory=dict)
    access_lines: int = 0
    revision: str = "unknown"
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    elapsed: float = 0.0

    def best(self, test: str, target: str) -> Cell:
        return max(self.cells[(test, target)], key=lambda c: c.rps)

    def best_transfer(self, direction: str, target: str) -> Transfer:
        return max(self.transfers[(direction, target)], key=lambda t: t.mb_s)

    def hostile_label(self) -> str:
        return (
            f"{self.hostile_slowloris} slowloris + {self.hostile_non_readers} non-readers held open"
        )

    def peak_rss(self, direction: str, target: str) -> float | None:
        peaks = [t.rss_peak_mib for t in self.transfers[(direction, target)]]
        known = [p for p in peaks if p is not None]
        return max(known) if known else None


def round_order(round_index: int, targets: tuple[str, ...] = TARGETS) -> tuple[str, ...]:
    """direct, baseline, gateway in odd rounds; the reverse in even ones."""
    return targets if round_index % 2 == 0 else targets[::-1]


def start_peer(
    processes: Processes, upstream_url: str, temp: Path, args: argparse.Namespace, pin: bool
) -> tuple[Process, str] | None:
    """npm's fast-gateway on the proxy's CPU, and its base URL; None (with the reason in
    stdout) when it is not wanted or cannot be installed."""
    if args.no_fast_gateway:
        print(f"{PEER}: --no-fast-gateway: skipped", flush=True)
        return None
    script = fastgateway.install(temp)
    if script is None:
        return None
    (port,) = free_ports(1)
    peer = processes.start(
        PEER, pinned(PROXY_CPU, fastgateway.command(script, upstream_url, port), pin)
    )
    return peer, f"http://{HOST}:{port}"


def bench(args: argparse.Namespace) -> Results:
    pin = can_pin() and not args.no_pin
    if pin:  # this process (the 1 GiB client, the Python load generator) shares CPU 1
        os.sched_setaffinity(0, {LOAD_CPU})
    loadgen = choose_loadgen(args.loadgen, args.connections, pin)
    print(f"load generator: {loadgen.description}", flush=True)
    results = Results(
        loadgen, pin, args.rounds, args.duration, args.warmup, args.transfer_mib * MIB
    )
    results.hostile_slowloris = args.hostile_slowloris
    results.hostile_non_readers = args.hostile_non_readers
    results.revision = git_revision()
    up_port, base_port, gw_port, admin_port = free_ports(4)
    upstream_url = f"http://{HOST}:{up_port}"
    bases = {
        "direct": upstream_url,
        "baseline": f"http://{HOST}:{base_port}",
        "gateway": f"http://{HOST}:{gw_port}",
    }
    access_log = OUT / "gateway-access.log"
    env = dict(
        os.environ,
        BENCH_LISTEN=f"{HOST}:{gw_port}",
        BENCH_ADMIN=f"{HOST}:{admin_port}",
        BENCH_UPSTREAM=upstream_url,
        BENCH_ACCESS_LOG=str(access_log),
        BENCH_JWT_KEY=str(OUT / "jwt-public.pem"),
        PYTHONPATH=str(ROOT),
    )
    auth_headers = {
        "none": (),
        "jwt": (f"Authorization: Bearer {bench_token(OUT / 'jwt-public.pem')}",),
        "api_key": (f"X-API-Key: {BENCH_API_KEY}",),
    }
    py = sys.executable
    base_at = f"{HOST}:{base_port}"
    gw_args = ["--listen", f"{HOST}:{gw_port}", "--admin", f"{HOST}:{admin_port}"]
    processes = Processes()
    temp = Path(tempfile.mkdtemp(prefix="bench-fast-gateway-"))
    try:
        upstream = processes.start(
            "upstream",
            pinned(
                LOAD_CPU, [py, str(BENCH / "upstream.py"), "--listen", f"{HOST}:{up_port}"], pin
            ),
        )
        baseline = processes.start(
            "baseline",
            pinned(
                PROXY_CPU,
                [py, str(BENCH / "baseline.py"), "--upstream", upstream_url, "--listen", base_at],
                pin,
            ),
        )
        gateway = processes.start(
            "gateway",
            pinned(
                PROXY_CPU,
                [py, "-m", "gateway", "--config", str(BENCH / "routes.bench.yaml"), *gw_args],
                pin,
            ),
            env=env,
        )
        deadline = time.monotonic() + STARTUP_DEADLINE
        wait_ready(upstream, bases["direct"] + "/small", deadline)
        wait_ready(baseline, bases["baseline"] + "/small", deadline)
        wait_ready(gateway, f"http://{HOST}:{admin_port}/readyz", deadline)
        wait_ready(gateway, bases["gateway"] + "/small", deadline)
        for target in TARGETS:
            check_bodies(bases[target], target)
        pids = {t: p.popen.pid for t, p in zip(TARGETS, (upstream, baseline, gateway), strict=True)}
        peer = start_peer(processes, upstream_url, temp, args, pin)
        if peer is None:
            results.peer_note = f"{PEER} did not run (see the bench's output)"
        else:
            bases[PEER] = peer[1]
            wait_ready(peer[0], peer[1] + "/small", time.monotonic() + STARTUP_DEADLINE)
            check_bodies(peer[1], PEER)
            pids[PEER] = peer[0].popen.pid
            results.targets = ("direct", "baseline", PEER, "gateway")

        for round_index in range(args.rounds):
            for test, (label, path) in TESTS.items():
                for target in round_order(round_index, results.targets):
                    url = bases[target] + path
                    if args.warmup > 0:
                        loadgen.run(url, args.warmup)
                    window = CpuWindow(list(pids.values()), pids[target])
                    cell = window.close(loadgen.run(url, args.duration))
                    results.cells.setdefault((test, target), []).append(cell)
                    print(
                        f"round {round_index + 1} {label:>15} {target:>12}: {cell.rps:10.0f} req/s"
                        f"  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms"
                        f"  server {cell.server_us or 0:5.0f} µs CPU/req"
                        f"  others {100 * (cell.other_cpu or 0):3.0f}% CPU"
                        + (f"  ERRORS {cell.errors}" if cell.errors else ""),
                        flush=True,
                    )
        if peer is not None:  # its cells are done: it leaves the CPU to the phases below
            processes.stop(peer[0])
            del pids[PEER]
        auth_phase(results, loadgen, bases["gateway"], auth_headers, list(pids.values()), args)
        results.compose = compose_phase.measure(bases["gateway"], args.rounds)
        results.rate_limits = measure_ratelimit(processes, loadgen, env, upstream_url, args, pin)
        results.cache = measure_cache(processes, loadgen, env, upstream_url, args, pin)
        results.workers = workers_phase.measure(
            start=processes.start,
            pinned=lambda argv: pinned(PROXY_CPU, argv, pin),
            unpinned=lambda argv: argv,
            wait_ready=wait_ready,
            run_load=loadgen.run,
            free_ports=free_ports,
            env=env,
            upstream_url=upstream_url,
            out=OUT,
            rounds=args.rounds,
            duration=args.duration,
            warmup=args.warmup,
            startup_deadline=STARTUP_DEADLINE,
        )
        results.tracing = measure_tracing(processes, loadgen, env, args, pin)
        rss_pids = {**pids, "direct": None}  # RSS is the proxy's; direct has none
        for round_index in range(args.transfer_rounds):
            for direction in ("upload", "download"):
                for target in round_order(round_index):
                    moved = run_on_uvloop(
                        transfer(
                            bases[target],
                            direction,
                            results.transfer_bytes,
                            rss_pids[target],
                            pids[target],
                        )
                    )
                    results.transfers.setdefault((direction, target), []).append(moved)
                    rss = (
                        f"  peak RSS {moved.rss_peak_mib:6.1f} MiB"
                        if moved.rss_peak_mib is not None
                        else ""
                    )
                    print(
                        f"round {round_index + 1} 1 GiB {direction:>8} {target:>8}: "
                        f"{moved.mb_s:8.1f} MB/s in {moved.seconds:5.2f} s{rss}"
                        f"  server {moved.server_cpu_s:4.2f} CPU s/GiB",
                        flush=True,
                    )
        # Last: the gateway keeps memory it grew for the hostile clients, which would show in
        # the streams' RSS.
        hostile_phase(
            results,
            loadgen,
            bases["gateway"] + "/small",
            gw_port,
            pids["gateway"],
            list(pids.values()),
            args,
        )
        for process in (upstream, baseline, gateway):
            if process.popen.poll() is not None:
                raise BenchError(f"{process.name} died during the run:\n{process.tail()}")
    finally:
        processes.stop_all()
        shutil.rmtree(temp, ignore_errors=True)
    with contextlib.suppress(OSError), access_log.open("rb") as lines:
        results.access_lines = sum(1 for _ in lines)
    return results


def measure_tracing(
    processes: Processes,
    loadgen: LoadGen,
    env: dict[str, str],
    args: argparse.Namespace,
    pin: bool,
) -> tracing_phase.TracingRun:
    return tracing_phase.measure(
        start=processes.start,
        pinned=lambda argv: pinned(PROXY_CPU, argv, pin),
        pinned_load=lambda argv: pinned(LOAD_CPU, argv, pin),
        wait_ready=wait_ready,
        run_load=loadgen.run,
        cpu_of=process_cpu,
        free_ports=free_ports,
        env=env,
        out=OUT,
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        startup_deadline=STARTUP_DEADLINE,
    )


def measure_ratelimit(
    processes: Processes,
    loadgen: LoadGen,
    env: dict[str, str],
    upstream_url: str,
    args: argparse.Namespace,
    pin: bool,
) -> list[ratelimit_phase.StoreRun]:
    return ratelimit_phase.measure(
        start=processes.start,
        pinned=lambda argv: pinned(PROXY_CPU, argv, pin),
        pinned_load=lambda argv: pinned(LOAD_CPU, argv, pin),
        wait_ready=wait_ready,
        run_load=loadgen.run,
        cpu_of=process_cpu,
        free_ports=free_ports,
        env=env,
        upstream_url=upstream_url,
        out=OUT,
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        startup_deadline=STARTUP_DEADLINE,
    )


def measure_cache(
    processes: Processes,
    loadgen: LoadGen,
    env: dict[str, str],
    upstream_url: str,
    args: argparse.Namespace,
    pin: bool,
) -> cache_phase.CacheRun:
    return cache_phase.measure(
        start=processes.start,
        pinned=lambda argv: pinned(PROXY_CPU, argv, pin),
        wait_ready=wait_ready,
        run_load=loadgen.run,
        cpu_of=process_cpu,
        free_ports=free_ports,
        env=env,
        upstream_url=upstream_url,
        out=OUT,
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        startup_deadline=STARTUP_DEADLINE,
    )


def phase_only(args: argparse.Namespace) -> int:
    """`--only tracing|cache|ratelimit`: the upstream and that phase, nothing else; the report is
    printed (bench/RESULTS.md is left as it is)."""
    pin = can_pin() and not args.no_pin
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})
    loadgen = choose_loadgen(args.loadgen, args.connections, pin)
    (up_port,) = free_ports(1)
    upstream_url = f"http://{HOST}:{up_port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    processes = Processes()
    try:
        upstream = processes.start(
            "upstream",
            pinned(
                LOAD_CPU,
                [sys.executable, str(BENCH / "upstream.py"), "--listen", f"{HOST}:{up_port}"],
                pin,
            ),
        )
        wait_ready(upstream, upstream_url + "/small", time.monotonic() + STARTUP_DEADLINE)
        if args.only == "tracing":
            run: Any = measure_tracing(processes, loadgen, env, args, pin)
            lines, judged = tracing_phase.section(run), tracing_phase.verdicts(run)
        elif args.only == "cache":
            run = measure_cache(processes, loadgen, env, upstream_url, args, pin)
            lines, judged = cache_phase.section(run), cache_phase.verdicts(run)
        else:
            runs = measure_ratelimit(processes, loadgen, env, upstream_url, args, pin)
            lines, judged = ratelimit_phase.section(runs), ratelimit_phase.verdicts(runs)
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
    print("\n".join(["", f"load generator: {loadgen.description}", *lines]))
    for budget, measured, passed in judged:
        print(f"{verdict_text(passed).strip('*'):>12}  {budget}: {measured}")
    return 0


def bench_token(public_key_file: Path) -> str:
    """A fresh RS256 key pair: the public half for routes.bench.yaml, a token signed with the
    private half (valid for a day: every request of the run presents the same bytes)."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_key_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    claims = {"sub": "bench", "iat": now, "exp": now + 86400, "scope": "bench"}
    return jwt.encode(claims, key, algorithm="RS256")


def auth_phase(
    results: Results,
    loadgen: LoadGen,
    base: str,
    headers: dict[str, tuple[str, ...]],
    pids: list[int],
    args: argparse.Namespace,
) -> None:
    """The small GET on the gateway without auth, with an RS256 JWT and with an API key,
    interleaved over rounds like the main cells."""
    gateway_pid = pids[-1]
    for round_index in range(args.rounds):
        order = tuple(AUTH_PATHS) if round_index % 2 == 0 else tuple(AUTH_PATHS)[::-1]
        for name in order:
            url = base + AUTH_PATHS[name]
            if args.warmup > 0:
                loadgen.run(url, args.warmup, headers[name])
            window = CpuWindow(pids, gateway_pid)
            cell = window.close(loadgen.run(url, args.duration, headers[name]))
            if cell.errors:
                raise BenchError(f"auth {name}: {cell.errors} refused or failed requests")
            results.auth_cells.setdefault(name, []).append(cell)
            print(
                f"round {round_index + 1} small GET auth {name:>7}: {cell.rps:10.0f} req/s"
                f"  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms"
                f"  server {cell.server_us or 0:5.0f} µs CPU/req",
                flush=True,
            )


# --- report ---------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if match:
            return f"{int(match[1]) / 2**20:.1f} GiB"
    return "unknown"


def versions() -> dict[str, str]:
    found = {"Python": platform.python_version(), "aiohttp": aiohttp.__version__}
    try:
        found["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        found["uvloop"] = "not installed (asyncio's default loop)"
    return found


@dataclass
class Verdict:
    budget: str
    measured: str
    passed: bool | None  # None: not measured


def lean_verdicts(results: Results) -> list[Verdict]:
    """Issue 17's: the gateway against the baseline and against npm fast-gateway."""
    out: list[Verdict] = []
    for test, budget in LEAN_BUDGETS.items():
        gw, base = results.best(test, "gateway"), results.best(test, "baseline")
        out.append(
            Verdict(
                f"gateway {TESTS[test][0]} req/s ≥ {budget} x baseline",
                f"{gw.rps:,.0f} vs {base.rps:,.0f} req/s = {gw.rps / base.rps:.2f}x",
                gw.rps >= budget * base.rps,
            )
        )
    against = f"gateway small-GET req/s ≥ {PEER}'s"
    if ("small", PEER) not in results.cells:
        out.append(Verdict(against, results.peer_note or f"{PEER} did not run", None))
        return out
    gw, peer = results.best("small", "gateway"), results.best("small", PEER)
    out.append(
        Verdict(
            against,
            f"{gw.rps:,.0f} vs {peer.rps:,.0f} req/s = {gw.rps / peer.rps:.2f}x",
            gw.rps >= peer.rps,
        )
    )
    return out


def verdicts(results: Results) -> list[Verdict]:
    out: list[Verdict] = []
    gw, base = results.best("small", "gateway"), results.best("small", "baseline")
    ratio = gw.rps / base.rps
    out.append(
        Verdict(
            f"gateway small-GET req/s ≥ {RPS_BUDGET} x baseline",
            f"{gw.rps:,.0f} vs {base.rps:,.0f} req/s = {ratio:.2f}x",
            ratio >= RPS_BUDGET,
        )
    )
    out += lean_verdicts(results)
    peaks = {d: results.peak_rss(d, "gateway") for d in ("upload", "download")}
    known = [p for p in peaks.values() if p is not None]
    shown = ", ".join(f"{d} {p:.1f} MiB" for d, p in peaks.items() if p is not None)
    out.append(
        Verdict(
            f"gateway peak RSS < {RSS_BUDGET_MIB:.0f} MiB while 1 GiB streams (either way)",
            shown or "not measured",
            max(known) < RSS_BUDGET_MIB if known else None,
        )
    )
    for direction in ("upload", "download"):
        g = results.best_transfer(direction, "gateway").mb_s
        b = results.best_transfer(direction, "baseline").mb_s
        out.append(
            Verdict(
                f"gateway {direction} MB/s ≥ {MBPS_BUDGET} x baseline",
                f"{g:,.0f} vs {b:,.0f} MB/s = {g / b:.2f}x",
                g >= MBPS_BUDGET * b,
            )
        )
    if results.auth_cells:
        plain = max(results.auth_cells["none"], key=lambda c: c.rps)
        for name, budget in AUTH_BUDGETS.items():
            cell = max(results.auth_cells[name], key=lambda c: c.rps)
            label = {"jwt": "RS256 JWT", "api_key": "API key"}[name]
            out.append(
                Verdict(
                    f"gateway small-GET req/s with {label} auth ≥ {budget} x the route without",
                    f"{cell.rps:,.0f} vs {plain.rps:,.0f} req/s = {cell.rps / plain.rps:.2f}x",
                    cell.rps >= budget * plain.rps,
                )
            )
    if results.hostile_runs and results.hostile_calm:
        held = max((r.cell for r in results.hostile_runs), key=lambda c: c.rps)
        calm = max(results.hostile_calm, key=lambda c: c.rps)
        out.append(
            Verdict(
                f"gateway small-GET req/s with {results.hostile_label()} "
                f"≥ {HOSTILE_RPS_BUDGET} x without them",
                f"{held.rps:,.0f} vs {calm.rps:,.0f} req/s = {held.rps / calm.rps:.2f}x",
                held.rps >= HOSTILE_RPS_BUDGET * calm.rps,
            )
        )
        peak = max(r.rss_peak_mib for r in results.hostile_runs)
        out.append(
            Verdict(
                f"gateway peak RSS < {HOSTILE_RSS_BUDGET_MIB:.0f} MiB with "
                f"{results.hostile_label()}",
                f"{peak:.1f} MiB",
                peak < HOSTILE_RSS_BUDGET_MIB,
            )
        )
    out += [Verdict(*v) for v in ratelimit_phase.verdicts(results.rate_limits)]
    out += [Verdict(*v) for v in cache_phase.verdicts(results.cache)]
    out += [Verdict(*v) for v in workers_phase.verdicts(results.workers)]
    out += [Verdict(*v) for v in tracing_phase.verdicts(results.tracing)]
    return out


def verdict_text(passed: bool | None) -> str:
    return {True: "**PASS**", False: "**FAIL**", None: "not measured"}[passed]


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "—"


def render(results: Results, command: str) -> str:
    pin_text = (
        f"proxy under test on CPU {PROXY_CPU}; load generator, upstream, the 1 GiB client "
        f"and the hostile clients on CPU {LOAD_CPU} (`taskset`)"
        if results.pin
        else "none (taskset missing, fewer than 2 CPUs, or --no-pin): every process shares CPUs"
    )
    lg = results.loadgen
    cell_cmd = (
        f"`wrk -t1 -c{lg.connections} -d{results.duration:g}s --latency URL`"
        if lg.kind == "wrk"
        else f"`bench/loadgen.py --connections {lg.connections} --duration {results.duration:g}`"
    )
    lines = [
        "# Benchmark: gateway vs a minimal aiohttp proxy vs direct",
        "",
        f"Written by `{command}` on {results.started:%Y-%m-%d %H:%M} UTC "
        f"(the run took {results.elapsed:.0f} s). Re-run it to refresh this file.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPUs (nproc) | {os.cpu_count()} |",
        f"| CPU model | {cpu_model()} |",
        f"| memory | {memory_gib()} |",
        f"| kernel | {platform.system()} {platform.release()} |",
        *(f"| {name} | {version} |" for name, version in versions().items()),
        f"| gateway code | {results.revision} |",
        f"| load generator | {lg.description} |",
        f"| CPU pinning | {pin_text} |",
        "",
        "## Method",
        "",
        "- Targets: **direct** = the upstream (`bench/upstream.py`, aiohttp on uvloop) with no "
        "proxy; **baseline** = `bench/baseline.py`, a minimal aiohttp streaming proxy (one "
        "ClientSession, no features); **gateway** = `python -m gateway` with "
        "`bench/routes.bench.yaml` (one catch-all route, one worker, JSON access log on, "
        f"written to a file: {results.access_lines:,} access lines this run)"
        + (
            f"; **{PEER}** = npm's fast-gateway {fastgateway.VERSION} on Node "
            f"{fastgateway.node_version()} (`bench/fastgateway.py`: a five-line proxy, installed "
            "by npm into a temporary directory), in the request/response cells only."
            if PEER in results.targets
            else f". {results.peer_note}."
        ),
        f"- Each cell: a {results.warmup:g} s warm-up, then {cell_cmd}. "
        f"{results.rounds} rounds, targets interleaved ("
        + " → ".join(results.targets)
        + ", reversed "
        "every other round). Shown: the **best round by req/s**, with that round's p50/p99; "
        "every round's req/s is listed.",
        f"- 1 GiB streams: an aiohttp client in `bench/run.py` POSTs "
        f"{results.transfer_bytes / MIB:,.0f} MiB as a chunked generator upload to `/sink`, "
        "and reads `/stream` with `iter_chunked` (256 KiB chunks). "
        f"{len(next(iter(results.transfers.values()), []))} rounds, interleaved; shown: the "
        "best MB/s (1 MB = 10⁶ bytes) and the **worst** peak RSS of the proxy process "
        "(VmHWM after resetting it through /proc/PID/clear_refs, and VmRSS sampled every "
        "20 ms, whichever is higher).",
        "- *server CPU µs/req*: CPU time (user + system, all threads) of the process answering "
        "(the upstream for direct, else the proxy) during the measured window, divided by the "
        "requests completed: what a request costs, whatever else ran on the machine. "
        "*server CPU s/GiB* is the same for the streams (best round's).",
        f"- Hostile clients, last (the gateway keeps memory it grows for them): "
        f"`bench/hostile.py`, asyncio raw sockets in this process, to 127.0.0.1 only, hold "
        f"{results.hostile_slowloris} **slowloris** connections (a partial request head, then "
        f"{TRICKLE_BYTES} header bytes every {TRICKLE_EVERY:g} s, never finished) and "
        f"{results.hostile_non_readers} **non-readers** (SO_RCVBUF {RCVBUF} bytes, a complete "
        f"`GET /stream?bytes={STREAM_BYTES}`, never read) open on the gateway's port; every "
        "one the gateway closes (this end left ESTABLISHED, or /proc/net/tcp shows the "
        "gateway no longer holds its end) is re-opened within "
        f"{HOSTILE_TICK:g} s, so the pressure stays constant and the re-opened count shows the "
        "gateway's header and send timeouts at work. Once they are open and the gateway is "
        f"quiet (under {QUIET_CPU:.0%} of a CPU: the non-readers' buffers are full), the same "
        "warm-up and window as above run the small GET against the gateway; "
        f"{results.rounds} rounds, each also with a window without them (interleaved, order "
        "reversed every other round). Shown: the best round by req/s of each, and the "
        "**worst** peak RSS of the gateway (VmHWM reset before the clients open, and VmRSS "
        "sampled every 20 ms, whichever is higher).",
        *background_note(results),
        "",
        "## Request/response",
        "",
        "| test | target | req/s | p50 ms | p99 ms | ÷ baseline | ÷ direct | server CPU µs/req "
        "| req/s per round |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for test, (label, path) in TESTS.items():
        direct, base = results.best(test, "direct"), results.best(test, "baseline")
        for target in results.targets:
            cell = results.best(test, target)
            rounds = " / ".join(f"{c.rps:,.0f}" for c in results.cells[(test, target)])
            errors = sum(c.errors for c in results.cells[(test, target)])
            if errors:
                rounds += f" (**{errors} errors**)"
            cpu = "—" if cell.server_us is None else f"{cell.server_us:.0f}"
            lines.append(
                f"| {label} `{path}` | {target} | {cell.rps:,.0f} | {cell.p50_ms:.2f} | "
                f"{cell.p99_ms:.2f} | {ratio(cell.rps, base.rps) if target in PROXIES else '—'}"
                f" | {ratio(cell.rps, direct.rps) if target != 'direct' else '—'} | {cpu} "
                f"| {rounds} |"
            )
    lines += [
        "",
        "## 1 GiB streams",
        "",
        "| direction | target | MB/s | seconds | proxy RSS before → peak, MiB | ÷ baseline "
        "| server CPU s/GiB | MB/s per round |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for direction in ("upload", "download"):
        base_mb = results.best_transfer(direction, "baseline").mb_s
        for target in TARGETS:
            best = results.best_transfer(direction, target)
            moves = results.transfers[(direction, target)]
            before = max((t.rss_before_mib or 0.0) for t in moves)
            peak = results.peak_rss(direction, target)
            rss = f"{before:.1f} → {peak:.1f}" if peak is not None else "—"
            rounds = " / ".join(f"{t.mb_s:,.0f}" for t in moves)
            lines.append(
                f"| {direction} | {target} | {best.mb_s:,.0f} | {best.seconds:.2f} | {rss} | "
                f"{ratio(best.mb_s, base_mb) if target == 'gateway' else '—'} | "
                f"{best.server_cpu_s:.2f} | {rounds} |"
            )
    lines += hostile_section(results)
    lines += ["", *ratelimit_phase.section(results.rate_limits)]
    lines += ["", *cache_phase.section(results.cache)]
    lines += workers_phase.section(results.workers)
    lines += tracing_phase.section(results.tracing)
    lines += ["", *compose_phase.section(results.compose)]
    lines += ["", "## Budgets", "", "| budget | measured | verdict |", "| --- | --- | --- |"]
    lines += [
        f"| {v.budget} | {v.measured} | {verdict_text(v.passed)} |" for v in verdicts(results)
    ]
    return "\n".join(lines) + "\n"


def hostile_section(results: Results) -> list[str]:
    if not results.hostile_runs or not results.hostile_calm:
        return []
    calm = max(results.hostile_calm, key=lambda c: c.rps)
    runs = results.hostile_runs
    best = max(runs, key=lambda r: r.cell.rps)
    lines = [
        "",
        "## Hostile clients",
        "",
        "| small JSON GET `/small` on the gateway | req/s | p50 ms | p99 ms | ÷ without "
        "| server CPU µs/req | gateway RSS before → peak, MiB | held at end: slowloris / "
        "non-readers | re-opened: slowloris / non-readers | req/s per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for label, cell, cells, rss, held, reopened in (
        ("without hostile clients", calm, results.hostile_calm, "—", "—", "—"),
        (
            f"with {results.hostile_label()}",
            best.cell,
            [r.cell for r in runs],
            f"{max(r.rss_before_mib for r in runs):.1f} → {max(r.rss_peak_mib for r in runs):.1f}",
            ", ".join(
                f"{r.report.open_at_end['slowloris']} / {r.report.open_at_end['non_reader']}"
                for r in runs
            ),
            ", ".join(
                f"{r.report.reconnects['slowloris']} / {r.report.reconnects['non_reader']}"
                for r in runs
            ),
        ),
    ):
        rounds = " / ".join(f"{c.rps:,.0f}" for c in cells)
        errors = sum(c.errors for c in cells)
        if errors:
            rounds += f" (**{errors} errors**)"
        cpu = "—" if cell.server_us is None else f"{cell.server_us:.0f}"
        lines.append(
            f"| {label} | {cell.rps:,.0f} | {cell.p50_ms:.2f} | {cell.p99_ms:.2f} | "
            f"{ratio(cell.rps, calm.rps) if cell is not calm else '—'} | {cpu} | {rss} | "
            f"{held} | {reopened} | {rounds} |"
        )
    lines.append("")
    for index, run in enumerate(runs, 1):
        report = run.report
        lines.append(
            f"- Round {index}: {report.opened:,} connections opened "
            f"({report.failed_connects} connects failed), all open in "
            f"{report.ready_seconds:.1f} s; {report.responses_started} of "
            f"{report.non_readers} non-readers' responses had begun arriving; the gateway was "
            f"quiet {run.quiet_seconds:.1f} s later; held {report.seconds:.1f} s in all"
            + (
                f"; {report.not_accepted_at_end} still in the listen backlog at the end"
                if report.not_accepted_at_end
                else ""
            )
            + (
                f"; **the gateway passed {HOSTILE_RSS_ABORT_MIB:.0f} MiB RSS, so the clients "
                "let go early**"
                if run.capped
                else ""
            )
            + "."
        )
    return lines


def background_note(results: Results) -> list[str]:
    """How much CPU other processes took while we measured: figures are only as good as that."""
    others = [c.other_cpu for cells in results.cells.values() for c in cells]
    known = [o for o in others if o is not None]
    if not known:
        return []
    worst, mean = max(known), sum(known) / len(known)
    line = (
        f"- Processes outside the bench used {100 * mean:.0f}% of a CPU on average during the "
        f"measured windows ({100 * worst:.0f}% at most)"
    )
    if worst > NOISY_CPU:
        return [
            line + ": **some windows shared the machine**, so their req/s and latencies are "
            "low; best-of-rounds limits that, and CPU µs/req is hardly affected. Re-run on an "
            "idle machine for clean figures."
        ]
    return [line + "."]


def git_revision() -> str:
    """HEAD's short hash, and whether gateway/ differs from it in the work tree."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    if not head:
        return "unknown (not a git work tree)"
    return f"`{head}`" + (" plus uncommitted changes in gateway/" if dirty else " (clean)")


def command_line(argv: list[str]) -> str:
    if "MAKELEVEL" in os.environ and not argv:
        return "make bench"
    return " ".join([".venv/bin/python bench/run.py", *argv])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gateway vs baseline vs direct benchmark")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell")
    parser.add_argument("--connections", type=int, default=32, help="load generator connections")
    parser.add_argument("--transfer-mib", type=int, default=1024, help="MiB per 1 GiB stream")
    parser.add_argument("--transfer-rounds", type=int, default=2, help="rounds of the streams")
    parser.add_argument("--hostile-slowloris", type=int, default=500, help="slowloris clients")
    parser.add_argument("--hostile-non-readers", type=int, default=200, help="non-reading clients")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-fast-gateway", action="store_true", help=f"skip the {PEER} cells")
    parser.add_argument(
        "--only",
        choices=("tracing", "cache", "ratelimit"),
        help="run one phase alone (printed, not written)",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="Markdown file to write (bench/RESULTS.md)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.transfer_rounds < 1 or args.duration <= 0:
        parser.error("--rounds, --transfer-rounds and --duration must be positive")
    if min(args.hostile_slowloris, args.hostile_non_readers) < 0:
        parser.error("--hostile-slowloris and --hostile-non-readers must be >= 0")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop processes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    if args.only is not None:
        return phase_only(args)
    started = time.monotonic()
    try:
        results = bench(args)
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    results.elapsed = time.monotonic() - started
    report = render(results, command_line(argv))
    args.results.write_text(report)
    print()
    print(report)
    for verdict in verdicts(results):
        print(
            f"{verdict_text(verdict.passed).strip('*'):>12}  {verdict.budget}: {verdict.measured}"
        )
    print(f"\nwritten to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
