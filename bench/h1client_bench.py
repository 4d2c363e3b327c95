"""The lean upstream client (gateway/upstream/h1client.py) against aiohttp's ClientSession, set
up as the gateway set it up before (upstream/service.py make_session), on small GETs to
bench/upstream.py.

Both clients run in this process on uvloop, one at a time, interleaved over rounds, each with
`--concurrency` requests in flight over keep-alive connections and the same proxy-like
request headers; each reads every body to the end. This process runs on CPU 0 and the
upstream on CPU 1 when there are two CPUs. Reported: req/s and this process's CPU µs per
request (the figure that holds up when other work shares the machine), best round.

RCVBUF=65536 in the environment caps the lean client's socket receive buffer (default: the
kernel's autotuning).

Usage: python bench/h1client_bench.py [--seconds 3] [--rounds 3] [--path /small] [--short]
       python bench/h1client_bench.py --path '/stream?bytes=1073741824' --concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
import uvloop
from yarl import URL

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's gateway, not an installed one

from gateway.config.model import Timeouts  # noqa: E402
from gateway.upstream.h1client import Limit, Pool  # noqa: E402
from gateway.upstream.service import ProxyRequest, _upstream_socket  # noqa: E402

HOST: Final = "127.0.0.1"
RCV: Final = int(os.environ.get("RCVBUF", "0")) or None  # the lean client's SO_RCVBUF
HEADERS: Final = [  # what the forwarder sends on a plain GET
    ("Accept", "*/*"),
    ("User-Agent", "wrk"),
    ("X-Forwarded-For", "127.0.0.1"),
    ("X-Forwarded-Proto", "http"),
    ("X-Request-ID", "0123456789abcdef0123456789abcdef"),
    ("traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"),
    ("X-Forwarded-Host", "gateway.example"),
]
Send = Callable[[], Awaitable[int]]


def start_upstream(port: int, pin: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(ROOT / "bench" / "upstream.py"), "--listen", f"{HOST}:{port}"]
    if pin:
        argv = ["taskset", "-c", "1", *argv]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the upstream did not listen on {port}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


async def drive(send: Send, concurrency: int, seconds: float) -> tuple[float, float]:
    """(req/s, CPU µs per request) of `concurrency` loops calling `send` for `seconds`."""
    count = 0
    stop = False

    async def loop() -> None:
        nonlocal count
        while not stop:
            await send()
            count += 1

    tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
    await asyncio.sleep(0.3)  # warm: connections open, caches hot
    count = 0
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    done, cpu, wall = count, time.process_time() - cpu, time.perf_counter() - wall
    stop = True
    await asyncio.gather(*tasks)
    return done / wall, cpu * 1e6 / max(done, 1)


async def main_async(args: argparse.Namespace, port: int) -> None:
    base = f"http://{HOST}:{port}"
    session = aiohttp.ClientSession(  # as gateway.upstream.make_session builds it
        connector=aiohttp.TCPConnector(
            limit=1000, limit_per_host=0, socket_factory=_upstream_socket
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        request_class=ProxyRequest,
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=60),
        read_bufsize=2**16,
    )
    session._retry_connection = False
    url = URL(base + args.path, encoded=True)
    pool = Pool(base, Limit(1000), Timeouts(connect=5, read=60, total=None), rcvbuf=RCV)

    async def with_aiohttp() -> int:  # read as the relay reads (forward.py)
        size = 0
        async with session.request("GET", url, headers=HEADERS, allow_redirects=False) as r:
            while chunk := await r.content.readany():
                size += len(chunk)
        return size

    async def with_lean() -> int:
        size = 0
        response = await pool.request("GET", args.path, HEADERS)
        try:
            while chunk := await response.read_chunk():
                size += len(chunk)
        finally:
            response.close()  # a no-op once the body has ended
        return size

    assert await with_aiohttp() == await with_lean() > 0
    clients: dict[str, Send] = {"aiohttp": with_aiohttp, "h1client": with_lean}
    best: dict[str, tuple[float, float]] = {}
    for round_ in range(args.rounds):
        order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
        for name in order:
            rps, cpu = await drive(clients[name], args.concurrency, args.seconds)
            print(f"round {round_ + 1} {name:9} {rps:9,.0f} req/s {cpu:6.1f} CPU µs/req")
            if name not in best or rps > best[name][0]:
                best[name] = (rps, cpu)
    await session.close()
    pool.close()
    (a_rps, a_cpu), (h_rps, h_cpu) = best["aiohttp"], best["h1client"]
    print(f"\nGET {args.path}, {args.concurrency} in flight, best of {args.rounds} rounds:")
    print("| client | req/s | CPU µs/req |\n|---|---:|---:|")
    print(f"| aiohttp ClientSession | {a_rps:,.0f} | {a_cpu:.1f} |")
    print(f"| h1client | {h_rps:,.0f} | {h_cpu:.1f} |")
    print(f"ratio h1client / aiohttp: {h_rps / a_rps:.2f}x req/s, {a_cpu / h_cpu:.2f}x less CPU")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--path", default="/small", help="/small, /64k or /stream?bytes=N")
    parser.add_argument("--short", action="store_true", help="1 s windows, 2 rounds")
    args = parser.parse_args()
    if args.short:
        args.seconds, args.rounds = 1.0, 2
    pin = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
    if pin:
        os.sched_setaffinity(0, {0})
    port = free_port()
    upstream = start_upstream(port, pin)
    try:
        wait_listening(port, time.monotonic() + 20)
        uvloop.run(main_async(args, port))
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    main()
