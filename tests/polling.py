"""Waiting on loopback servers: free ports, and polling a condition until a deadline (never
sleeping a fixed time and hoping)."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

POLL: Final = 0.01  # seconds between two looks at a condition
T = TypeVar("T")


def free_port() -> int:
    """A loopback port nobody listens on right now (the caller binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> float:
    """Look at `check` (plain or async) until it holds; fail at the deadline. Returns the
    seconds it took."""
    started = time.monotonic()
    while not await _holds(check()):
        assert time.monotonic() - started < within, f"not true within {within}s"
        await asyncio.sleep(POLL)
    return time.monotonic() - started


async def poll_until(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, within: float
) -> T:
    """Call `probe` until `done(result)` or `within` seconds pass; return the last result, for
    the caller to assert on."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if done(result) or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(POLL)


async def _holds(result: Awaitable[bool] | bool) -> bool:
    return await result if inspect.isawaitable(result) else result


async def always(check: Callable[[], Awaitable[bool] | bool], during: float) -> None:
    """Look at `check` until `during` seconds have passed; fail the first time it does not
    hold (for what must not happen, such as a pool closing under a request)."""
    deadline = time.monotonic() + during
    while time.monotonic() < deadline:
        assert await _holds(check()), f"stopped holding within {during}s"
        await asyncio.sleep(POLL)
