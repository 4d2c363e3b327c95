"""Running the gateway: listeners, signals, graceful shutdown, and N worker processes.

One process serves the public and admin listeners. With --workers N, a supervisor starts N
such processes that share both ports through SO_REUSEPORT and relays SIGTERM/SIGINT/SIGHUP.
SIGTERM stops accepting, lets in-flight requests finish (up to limits.shutdown_grace), exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from gateway.accesslog import configure_logging
from gateway.app import Gateway, create_app
from gateway.model import GatewayConfig

logger = logging.getLogger("gateway")


def run(config: GatewayConfig, config_path: str, workers: int) -> int:
    if workers > 1:
        return _supervise(workers)
    return _run_loop(serve(config, config_path, reuse_port=bool(os.environ.get("GATEWAY_WORKER"))))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def serve(config: GatewayConfig, config_path: str, *, reuse_port: bool = False) -> int:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    configure_logging(config.access_log)
    gateway = Gateway(config, config_path)
    public = web.AppRunner(
        create_app(gateway),
        handler_cancellation=True,  # a client that disconnects cancels its upstream request
        access_log=None,  # our own JSON access log replaces aiohttp's
        shutdown_timeout=config.shutdown_grace,
    )
    admin = web.AppRunner(_admin_app(gateway), access_log=None, shutdown_timeout=1.0)
    await public.setup()
    await admin.setup()
    await web.TCPSite(public, *config.listen, reuse_port=reuse_port, backlog=1024).start()
    await web.TCPSite(admin, *config.admin, reuse_port=reuse_port).start()
    logger.info("listening on %s:%s, admin on %s:%s", *config.listen, *config.admin)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: gateway.request_reload())
    await stop.wait()
    logger.info("shutting down: draining in-flight requests for up to %ss", config.shutdown_grace)
    await public.cleanup()  # stops accepting, then waits for in-flight handlers
    await admin.cleanup()
    logger.info("stopped")
    return 0


def _admin_app(gateway: Gateway) -> web.Application:
    from gateway.admin import create_admin_app

    return create_admin_app(gateway)


def _supervise(workers: int) -> int:
    """Start `workers` processes on the same ports and relay signals until they all exit."""
    env = dict(os.environ, GATEWAY_WORKER="1")
    with contextlib.ExitStack() as stack:
        if "PROMETHEUS_MULTIPROC_DIR" not in env:  # metrics summed across workers
            env["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        args = [sys.executable, "-m", "gateway", *_worker_args(sys.argv[1:])]
        children = [subprocess.Popen(args, env=env) for _ in range(workers)]

        def relay(signum: int, _frame: object) -> None:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, relay)
        codes = [child.wait() for child in children]
    return max(codes, default=0)


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
