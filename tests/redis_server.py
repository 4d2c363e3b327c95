"""A private `redis-server` for tests: on a free loopback port, no persistence, killed at the
end. `REDIS_URL`, when set, is used instead (tests that kill or restart Redis then skip).

Nothing here touches a Redis the machine already runs (6379 is never assumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Final

import pytest

from tests.polling import free_port

READY_SECONDS: Final = 10.0
REDIS_SERVER: Final = shutil.which("redis-server")  # looked up once, off the event loop
SKIP_REASON: Final = (
    "needs Redis: install redis-server (apt-get install redis-server) so tests start a private "
    "one, or set REDIS_URL=redis://HOST:PORT/DB to a Redis they may write gateway:* keys to"
)


class RedisServer:
    """One redis-server child process (or an external REDIS_URL, which cannot be restarted)."""

    def __init__(self, url: str, port: int | None) -> None:
        self.url = url
        self.port = port  # None: external, not ours to stop
        self.namespace = uuid.uuid4().hex[:8]  # for route prefixes: tests never share buckets
        self._process: asyncio.subprocess.Process | None = None

    @property
    def owned(self) -> bool:
        return self.port is not None

    @classmethod
    async def start(cls) -> RedisServer:
        external = os.environ.get("REDIS_URL")
        if external:
            return cls(external, None)
        if REDIS_SERVER is None:
            pytest.skip(SKIP_REASON)
        port = free_port()
        server = cls(f"redis://127.0.0.1:{port}/0", port)
        await server.restart()
        return server

    async def restart(self) -> None:
        """Start redis-server on this server's port (again, after `kill`) and wait for PONG."""
        assert self.port is not None, "an external REDIS_URL cannot be restarted"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        self._process = await asyncio.create_subprocess_exec(
            REDIS_SERVER or "redis-server", *args, "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + READY_SECONDS
        while not await self.ping():
            assert self._process.returncode is None, "redis-server exited at start"
            assert time.monotonic() < deadline, f"redis-server not ready in {READY_SECONDS}s"
            await asyncio.sleep(0.02)

    async def ping(self) -> bool:
        assert self.port is not None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    def pause(self) -> None:
        """SIGSTOP: the server holds every connection and answers nothing (a stall, a long GC
        or swap on its host) until `resume`."""
        assert self._process is not None, "only a private redis-server can be paused"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as when the host dies."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await RedisServer.start()
    try:
        yield server
    finally:
        await server.kill()


@contextlib.asynccontextmanager
async def stalled_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis. Yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, write nothing, close nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
