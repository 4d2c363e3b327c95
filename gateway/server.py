"""Running the gateway: listeners, signals, graceful shutdown, and N worker processes.

One process serves the public and admin listeners. SIGHUP reloads the config file. SIGUSR1
reopens the access-log file (for logrotate). SIGTERM (or SIGINT) marks the process not ready,
stops accepting, lets in-flight requests finish (up to limits.shutdown_grace), flushes the logs
and exits 0. A SIGHUP or SIGUSR1 that arrives while the process starts waits for the loop
(`defer_signals`): their default action would end it.

With --workers N, a supervisor starts N such processes that share both ports through
SO_REUSEPORT, relays SIGTERM/SIGINT/SIGHUP/SIGUSR1 to them, and points prometheus-client at one
directory (PROMETHEUS_MULTIPROC_DIR) so /metrics sums every worker, and gives them another
(GATEWAY_STATE_DIR) where each publishes its /readyz, /routes and /config answers for any
worker to merge (servers/workers.py). GATEWAY_WORKERS tells each worker N (retry budgets are
per worker: see upstream/breaker.py). A worker that dies on its own is started again, and the
others keep serving meanwhile; at most RESPAWN_LIMIT restarts per RESPAWN_WINDOW, then the
next one waits (a worker that cannot start must not become a fork loop). Each is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from aiohttp import web
from prometheus_client import multiprocess

from gateway.config.model import GatewayConfig
from gateway.config.tls import ServerTls
from gateway.ops.accesslog import configure_logging
from gateway.runtime.state import Gateway
from gateway.servers.admin import AdminState, create_admin_app, publish
from gateway.servers.connection import GatewayRunner
from gateway.servers.public import create_app
from gateway.servers.workers import STATE_DIR_ENV, Snapshots, forget

logger = logging.getLogger("gateway")
config_log = logging.getLogger("gateway.config")
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
DEFERRED_SIGNALS: Final = (signal.SIGHUP, signal.SIGUSR1)  # reload, reopen the access log
ADMIN_SHUTDOWN_SECONDS: Final = 1.0
RESPAWN_LIMIT: Final = 5  # worker restarts per RESPAWN_WINDOW; more wait their turn
RESPAWN_WINDOW: Final = 30.0  # seconds
REAP_POLL: Final = 0.1  # seconds between two looks for exits while a restart waits


def run(config: GatewayConfig, config_path: str, workers: int, warnings: Sequence[str] = ()) -> int:
    if workers > 1:
        return _supervise(workers)
    reuse_port = bool(os.environ.get("GATEWAY_WORKER"))
    tune_gc()
    tune_malloc()
    return _run_loop(serve(config, config_path, reuse_port=reuse_port, warnings=warnings))


GC_THRESHOLDS: Final = (10_000, 20, 20)  # CPython's defaults: (700, 10, 10)


def tune_gc() -> None:
    """Collect the young generation every 10,000 allocations instead of every 700.

    aiohttp allocates a few hundred objects per proxied request, almost all freed at once by
    reference counting, so the default threshold runs a generation-0 scan every couple of
    requests for nothing: about 10 µs of CPU per request (measured in bench/PROFILE.md).
    Start-up objects are frozen out of the collector's way too. Cyclic garbage still goes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# glibc's mallopt parameters (malloc.h) and the values the gateway sets.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MALLOC_TRIM_THRESHOLD: Final = 4 * 2**20  # bytes free at the heap's top before it shrinks
MALLOC_MMAP_THRESHOLD: Final = 2**20  # allocations this big get their own mapping


def tune_malloc() -> None:
    """Keep up to 4 MiB of freed heap instead of 128 KiB (glibc only; elsewhere nothing).

    Relaying 64 KiB bodies allocates and frees 64 KiB objects all the time; with glibc's
    default the heap shrinks back to the kernel after each burst and grows again, 6-7 page
    faults (and a trim) per 64 KiB response (bench/PROFILE.md). The mmap threshold is fixed
    with it (setting one turns glibc's adaptive thresholds off), at 1 MiB: bigger than any
    chunk relayed, so chunks come from the heap."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator as it is
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def serve(
    config: GatewayConfig,
    config_path: str,
    *,
    reuse_port: bool = False,
    warnings: Sequence[str] = (),
) -> int:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config file. Returns the exit code."""
    output = configure_logging(config.access_log)
    try:
        return await _serve(config, config_path, reuse_port, warnings)
    finally:
        output.stop()  # every queued log line is written before the process exits


async def _serve(
    config: GatewayConfig, config_path: str, reuse_port: bool, warnings: Sequence[str]
) -> int:
    gateway = Gateway(config, config_path, warnings)
    state = AdminState()
    state_dir = os.environ.get(STATE_DIR_ENV)
    shared = Snapshots(Path(state_dir)) if state_dir else None
    public = GatewayRunner(
        create_app(gateway),
        gateway,
        handler_cancellation=True,  # a client that disconnects cancels its upstream request
        access_log=None,  # our own JSON access log replaces aiohttp's
        shutdown_timeout=config.shutdown_grace,
    )
    admin = web.AppRunner(
        create_admin_app(gateway, state, shared),
        access_log=None,
        shutdown_timeout=ADMIN_SHUTDOWN_SECONDS,
    )
    try:
        gateway.tls = None if config.tls is None else await asyncio.to_thread(ServerTls, config.tls)
    except (OSError, ssl.SSLError) as exc:
        logger.error("cannot load the listener's certificate and key: %s", type(exc).__name__)
        return 1
    await public.setup()
    await admin.setup()
    try:
        await web.TCPSite(
            public,
            *config.listen,
            reuse_port=reuse_port,
            backlog=1024,
            ssl_context=None if gateway.tls is None else gateway.tls.context,
        ).start()
        await web.TCPSite(admin, *config.admin, reuse_port=reuse_port).start()
    except OSError as exc:
        logger.error("cannot listen: %s", exc.strerror or exc)
        await admin.cleanup()
        await public.cleanup()
        return 1
    config_log.info(
        "serving %s: version %s, %d routes",
        config.file,
        config.version_hash[:12],
        len(config.routes),
    )
    scheme = "https" if gateway.tls else "http"
    logger.info("listening on %s://%s:%s, admin on %s:%s", scheme, *config.listen, *config.admin)
    publishing = None
    if shared is not None:  # --workers N: every worker's answers, merged by whichever answers
        publishing = asyncio.get_running_loop().create_task(
            publish(gateway, state, shared), name="admin snapshot"
        )
    await _until_stopped(gateway)
    state.draining = True  # /readyz answers 503 from now on
    logger.info("shutting down: draining in-flight requests for up to %ss", config.shutdown_grace)
    await public.cleanup()  # stops accepting, waits for in-flight handlers, then cleanup_ctx
    await admin.cleanup()
    if publishing is not None and shared is not None:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await asyncio.to_thread(forget, shared.directory, shared.pid)
    logger.info("stopped")
    return 0


_deferred: set[int] = set()  # SIGHUP and SIGUSR1 that came before the loop's handlers


def defer_signals() -> None:
    """Called first thing (gateway/__main__.py): until `_until_stopped` installs the loop's
    handlers, a SIGHUP or SIGUSR1 is remembered, then acted on once, instead of ending the
    process (their default action). The supervisor starts workers with both blocked (see
    `_Supervisor.spawn`), so a relayed signal waits in the kernel until this unblocks it."""
    for sig in DEFERRED_SIGNALS:
        signal.signal(sig, _remember)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)


def _remember(signum: int, _frame: FrameType | None) -> None:
    _deferred.add(signum)


async def _until_stopped(gateway: Gateway) -> None:
    """Wait for SIGTERM or SIGINT. The handlers stay installed: a second signal while
    draining (Ctrl-C reaches both the supervisor and its workers) changes nothing. SIGHUP
    reloads and SIGUSR1 reopens the access log, also if one came while starting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    actions = {signal.SIGHUP: gateway.request_reload, signal.SIGUSR1: gateway.access_log.reopen}
    for sig, action in actions.items():
        loop.add_signal_handler(sig, action)
        if sig in _deferred:
            _deferred.discard(sig)
            action()
    await stop.wait()


def _supervise(workers: int) -> int:
    """Start `workers` processes on the same ports and relay signals until they all exit."""
    output = configure_logging()
    try:
        with contextlib.ExitStack() as stack:
            env = dict(os.environ, GATEWAY_WORKER="1", GATEWAY_WORKERS=str(workers))
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-admin-"))
            env[STATE_DIR_ENV] = state_dir
            metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR")
            if metrics_dir:
                _wipe_metrics(Path(metrics_dir))  # counts from an earlier run must not add up
            else:
                metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-"))
                env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            return _Supervisor(workers, env, metrics_dir).run()
    finally:
        output.stop()


def _wipe_metrics(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)


class RespawnLimit:
    """At most `limit` restarts in any `window` seconds: `next_at(now)` is when the next may
    run (now, or when the oldest of the last `limit` leaves the window), and books it."""

    def __init__(self, limit: int = RESPAWN_LIMIT, window: float = RESPAWN_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._booked: deque[float] = deque(maxlen=limit)

    def next_at(self, now: float) -> float:
        at = now
        if len(self._booked) == self.limit:
            at = max(now, self._booked[0] + self.window)
        self._booked.append(at)
        return at


class _Supervisor:
    def __init__(self, workers: int, env: dict[str, str], metrics_dir: str) -> None:
        self.workers = workers
        self.env = env
        self.metrics_dir = metrics_dir
        self.state_dir = Path(env[STATE_DIR_ENV])
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.args: list[str] = []
        self.limit = RespawnLimit()

    def relay(self, signum: int, _frame: FrameType | None) -> None:
        if signum not in DEFERRED_SIGNALS:
            self.stopping = True
        for child in self.children.values():
            if child.returncode is None:
                child.send_signal(signum)

    def run(self) -> int:
        for sig in (*STOP_SIGNALS, *DEFERRED_SIGNALS):
            signal.signal(sig, self.relay)
        _deferred.clear()  # workers not started yet read the file and open the log themselves
        self.args = [sys.executable, "-m", "gateway", *_worker_args(sys.argv[1:])]
        for _ in range(self.workers):
            if self.stopping:
                break
            self.spawn(self.args)
        logger.info("supervising %d workers: pids %s", len(self.children), sorted(self.children))
        return self._wait()

    def spawn(self, args: list[str]) -> int:
        """Start one worker with SIGHUP and SIGUSR1 blocked: a blocked signal stays blocked
        across fork and exec, so one relayed while the worker starts waits until its
        `defer_signals` is ready for it, instead of killing it (and with it the group)."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
        try:
            child = subprocess.Popen(args, env=self.env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.children[child.pid] = child
        return child.pid

    def _wait(self) -> int:
        """Reap workers until all are gone after a stop signal; restart those that die before
        (rate-limited: see RespawnLimit). Returns the first non-zero exit status seen while
        stopping (a worker that crashed and was restarted does not fail the group)."""
        first_failure = 0
        running = set(self.children)
        restarts: list[float] = []  # when the restarts waiting their turn may run
        while running or (restarts and not self.stopping):
            if self.stopping:
                restarts.clear()
            elif restarts and restarts[0] <= time.monotonic():
                restarts.pop(0)
                pid = self.spawn(self.args)
                running.add(pid)
                logger.info("worker %d started in place of one that exited", pid)
                continue
            pid, status = self._reap(block=not restarts)
            if pid not in running:
                continue
            running.discard(pid)
            code = self.children.pop(pid).returncode = os.waitstatus_to_exitcode(status)
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]  # not annotated upstream
            forget(self.state_dir, pid)
            if self.stopping:
                if code and not first_failure:
                    first_failure = code if code > 0 else 1
                continue
            now = time.monotonic()
            at = self.limit.next_at(now)
            restarts.append(at)
            if at > now:
                logger.warning(
                    "worker %d exited with %d; %d restarts in %ds already: restarting it in %.0fs",
                    pid, code, RESPAWN_LIMIT, RESPAWN_WINDOW, at - now,
                )  # fmt: skip
            else:
                logger.warning("worker %d exited with %d; restarting it", pid, code)
        logger.info("all workers stopped")
        return first_failure

    def _reap(self, block: bool) -> tuple[int, int]:
        """(pid, wait status) of an exited worker; (0, 0) when none exited within REAP_POLL."""
        if block:  # a signal runs relay(), then the wait resumes
            return os.waitpid(-1, 0)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # every worker is gone and the restart waits its turn
            pid, status = 0, 0
        if pid == 0:
            time.sleep(REAP_POLL)
        return pid, status


def _worker_args(argv: list[str]) -> list[str]:
    """The command line minus --workers N (or --workers=N)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out
