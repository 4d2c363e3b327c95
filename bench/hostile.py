"""Hostile clients for `make bench`: slowloris connections and clients that never read.

`Hostile(port, slowloris=500, non_readers=200, lifetime=60)` is an async context manager. On
entry it opens the connections to 127.0.0.1:PORT (nowhere else):

- a **slowloris** sends a partial request head (`GET /small HTTP/1.1`, `Host`, no blank line),
  then a couple of header bytes every few seconds, never finishing the head;
- a **non-reader** sets a small SO_RCVBUF, sends a complete `GET /stream?bytes=N` for a large
  response, and never reads the socket: the response stalls in the server's buffers.

While the body runs, one task trickles the slowloris bytes and re-opens every connection the
server closed (its socket left ESTABLISHED: a FIN or RST arrived), so the pressure stays
constant; `report` counts those reconnects, which is how the server's header and send
timeouts show. On exit, or once `lifetime` seconds have passed (whichever comes first), it
stops and closes every socket: count and time bounded, it stops by itself.

A connection counts as closed by the server when its socket here left ESTABLISHED (a FIN or
RST arrived), or when the server process no longer holds its end: /proc/net/tcp lists the
server's socket with inode 0 (an orphan the kernel still flushes) or not at all. The second
test is what sees a non-reader closed: the server's FIN waits behind unsent response bytes
that this client never reads, and its close() sends no RST. A connection the server has not
accepted yet (inode 0 from the start: still in the listen backlog) is not counted as closed.

Usage: python bench/hostile.py --port PORT [--slowloris 500] [--non-readers 200] [--seconds 20]
(prints the report as JSON when done; `bench/run.py` uses the context manager in-process.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Final, Literal

HOST: Final = "127.0.0.1"  # the only address these clients connect to
SLOW_HEAD: Final = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-slowloris\r\n"
TRICKLE: Final = b"X-Slow: a\r\n"  # repeated two bytes at a time, never the final blank line
TRICKLE_BYTES: Final = 2
TRICKLE_EVERY: Final = 3.0  # seconds between a slowloris's sends (each starts at a random phase)
STREAM_BYTES: Final = 32 * 2**20  # a non-reader's response: far more than the buffers between
RCVBUF: Final = 4096  # a non-reader's SO_RCVBUF (the kernel doubles it)
TICK: Final = 0.25  # seconds between the keeper's passes (state checks, trickles, re-opens)
CONNECT_TIMEOUT: Final = 5.0  # seconds for one connect + first send
OPEN_CONCURRENCY: Final = 64  # connects in flight at once
READY_DEADLINE: Final = 10.0  # seconds for every non-reader's response to start arriving
TCP_ESTABLISHED: Final = 1  # tcp_info.tcpi_state (include/net/tcp_states.h)
BYTES_RECEIVED_AT: Final = 128  # offset of tcp_info.tcpi_bytes_received (u64, Linux >= 4.1)

Kind = Literal["slowloris", "non_reader"]


@dataclass
class Report:
    """What the hostile clients saw; counts are per kind: slowloris, non-readers."""

    slowloris: int
    non_readers: int
    opened: int = 0  # connections opened: the first ones and every re-open
    reconnects: dict[str, int] = field(default_factory=lambda: {"slowloris": 0, "non_reader": 0})
    failed_connects: int = 0  # connects (or first sends) that failed or timed out
    open_at_end: dict[str, int] = field(default_factory=lambda: {"slowloris": 0, "non_reader": 0})
    not_accepted_at_end: int = 0  # of those open at the end: still in the listen backlog
    responses_started: int = 0  # non-readers whose response had begun arriving, at the end
    ready_seconds: float = 0.0  # from entry until every connection was open and stalled
    seconds: float = 0.0  # from entry to exit
    stopped_by_lifetime: bool = False


@dataclass
class Conn:
    kind: Kind
    sock: socket.socket | None = None
    next_send: float = 0.0
    sent: int = 0  # trickled bytes so far: the head goes on where it left off
    port: int = 0  # this end's port: the server's socket has it as its remote port
    accepted: bool = False  # the server process was seen holding its end


def tcp_state(sock: socket.socket) -> tuple[int, int | None]:
    """(tcpi_state, tcpi_bytes_received or None) without reading the socket."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    received = None
    if len(info) >= BYTES_RECEIVED_AT + 8:
        (received,) = struct.unpack_from("Q", info, BYTES_RECEIVED_AT)
    return info[0], received


def alive(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        return tcp_state(sock)[0] == TCP_ESTABLISHED
    except OSError:
        return False


def server_ends(port: int) -> dict[int, int]:
    """{client port: inode} of the server's sockets on 127.0.0.1:`port` (0: no process holds it)."""
    local = f"0100007F:{port:04X}"
    ends: dict[int, int] = {}
    with open("/proc/net/tcp") as table:  # procfs: served from memory, never blocks
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == local and fields[3] != "0A":  # 0A: the listening socket
                ends[int(fields[2].rpartition(":")[2], 16)] = int(fields[9])
    return ends


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


class Hostile:
    """Holds `slowloris` + `non_readers` hostile connections to 127.0.0.1:`port` open."""

    def __init__(
        self,
        port: int,
        slowloris: int = 500,
        non_readers: int = 200,
        lifetime: float = 60.0,
        stream_bytes: int = STREAM_BYTES,
    ) -> None:
        self.port = port
        self.lifetime = lifetime
        self.request = (
            f"GET /stream?bytes={stream_bytes} HTTP/1.1\r\nHost: {HOST}\r\n"
            "User-Agent: bench-non-reader\r\n\r\n"
        ).encode()
        self.conns = [Conn("slowloris") for _ in range(slowloris)]
        self.conns += [Conn("non_reader") for _ in range(non_readers)]
        self.report = Report(slowloris, non_readers)
        self._gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        self._stop = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._started = 0.0
        self._closed = False

    def stop(self) -> None:
        """Stop trickling and re-opening and close every socket soon (e.g. on a memory cap)."""
        self._stop.set()

    async def wait(self, seconds: float) -> None:
        """Return after `seconds`, or sooner when stopped (by `stop` or the lifetime)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def __aenter__(self) -> Hostile:
        self._started = time.monotonic()
        raise_fd_limit(len(self.conns) + 1024)
        try:
            await asyncio.gather(*(self._open(c) for c in self.conns))
            self._keeper = asyncio.get_running_loop().create_task(self._keep())
            deadline = self._started + READY_DEADLINE
            while self._started_responses() < self.report.non_readers and not self._stop.is_set():
                if time.monotonic() > deadline:
                    break  # measured anyway; the report says how many responses had started
                await asyncio.sleep(0.05)  # polling interval
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self.report.ready_seconds = time.monotonic() - self._started
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._keeper is not None:
            await self._keeper
        self._close_all()

    def _started_responses(self) -> int:
        started = 0
        for conn in self.conns:
            if conn.kind == "non_reader" and conn.sock is not None:
                with contextlib.suppress(OSError):
                    received = tcp_state(conn.sock)[1]
                    started += received is None or received > 0
        return started

    async def _open(self, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        async with self._gate:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if conn.kind == "non_reader":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sock.setblocking(False)
                payload = SLOW_HEAD if conn.kind == "slowloris" else self.request
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_connect(sock, (HOST, self.port))
                    await loop.sock_sendall(sock, payload)
            except (OSError, TimeoutError):
                sock.close()
                self.report.failed_connects += 1
                conn.sock = None
                return
        self.report.opened += 1
        conn.sock = sock
        conn.sent = 0
        conn.port = sock.getsockname()[1]
        conn.accepted = False
        conn.next_send = time.monotonic() + random.uniform(0, TRICKLE_EVERY)

    def _holds(self, conn: Conn, ends: dict[int, int]) -> bool:
        """Whether the server still holds `conn` (or has not accepted it yet)."""
        if not alive(conn.sock):
            return False
        inode = ends.get(conn.port, 0)
        if inode:
            conn.accepted = True
        return bool(inode) or not conn.accepted

    def _trickle(self, conn: Conn, now: float) -> bool:
        """Send a slowloris's next bytes when due; False when the socket turned out closed."""
        if conn.kind != "slowloris" or conn.sock is None or now < conn.next_send:
            return True
        conn.next_send = now + TRICKLE_EVERY
        at = conn.sent % len(TRICKLE)
        chunk = (TRICKLE[at:] + TRICKLE)[:TRICKLE_BYTES]  # always well-formed header lines
        try:
            conn.sent += conn.sock.send(chunk)
        except BlockingIOError:
            return True  # the server is not reading: still a held connection
        except OSError:
            return False
        return True

    async def _keep(self) -> None:
        deadline = self._started + self.lifetime
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                self.report.stopped_by_lifetime = True
                self._stop.set()
                self._close_all()
                return
            reopen = []
            ends = server_ends(self.port)
            for conn in self.conns:
                held = conn.sock is not None
                if held and self._holds(conn, ends) and self._trickle(conn, now):
                    continue
                if held:
                    self.report.reconnects[conn.kind] += 1
                    assert conn.sock is not None
                    conn.sock.close()
                    conn.sock = None
                reopen.append(conn)
            if reopen:
                await asyncio.gather(*(self._open(c) for c in reopen))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._stop.wait()
        self._close_all()

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.report.responses_started = self._started_responses()
        ends = server_ends(self.port)
        for conn in self.conns:
            if conn.sock is not None and self._holds(conn, ends):
                self.report.open_at_end[conn.kind] += 1
                self.report.not_accepted_at_end += not conn.accepted
            if conn.sock is not None:
                conn.sock.close()  # unread response bytes: the kernel sends a RST
                conn.sock = None
        self.report.seconds = time.monotonic() - self._started


async def hold(port: int, slowloris: int, non_readers: int, seconds: float) -> Report:
    """Hold the hostile connections open for `seconds`, then close them."""
    async with Hostile(port, slowloris, non_readers, lifetime=seconds + READY_DEADLINE) as hostile:
        await hostile.wait(seconds)
    return hostile.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hold slowloris and non-reading clients open")
    parser.add_argument("--port", type=int, required=True, help=f"port on {HOST}")
    parser.add_argument("--slowloris", type=int, default=500)
    parser.add_argument("--non-readers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to hold them")
    args = parser.parse_args(argv)
    if min(args.slowloris, args.non_readers) < 0 or not 0 < args.seconds <= 3600:
        parser.error("counts must be >= 0 and --seconds in (0, 3600]")
    report = asyncio.run(hold(args.port, args.slowloris, args.non_readers, args.seconds))
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
