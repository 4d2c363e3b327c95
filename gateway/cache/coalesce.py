"""One upstream request per missing key at a time, in this worker.

The first miss of a key leads: it goes upstream, and `finish()` tells the others whether it
stored an entry. The others `wait()` within the route's timeout, then look up again: a stored
entry answers them; otherwise (the leader failed, the answer was not storable, the wait timed
out) each goes upstream itself, so a leader's failure is never shared. A leader that vanished
without finishing (its client left) is replaced once its deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

MAX_WAIT_SECONDS: Final = 60.0  # when the route sets no timeout at all


class Flight:
    __slots__ = ("deadline", "done")

    def __init__(self, deadline: float) -> None:
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.deadline = deadline


class Coalescer:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def lead(self, key: str, timeout: float) -> Flight | None:
        """A new Flight when this request leads for `key`; None when another one does."""
        now = time.monotonic()
        flight = self._flights.get(key)
        if flight is not None and not flight.done.done() and now < flight.deadline:
            return None
        flight = self._flights[key] = Flight(now + timeout)
        return flight

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait for the leader of `key`; True when it stored an entry."""
        flight = self._flights.get(key)
        if flight is None:
            return False
        remaining = flight.deadline - time.monotonic()
        try:
            async with asyncio.timeout(min(timeout, max(0.0, remaining))):
                return await asyncio.shield(flight.done)
        except TimeoutError:
            return False

    def finish(self, key: str, flight: Flight, stored: bool) -> None:
        if not flight.done.done():
            flight.done.set_result(stored)
        if self._flights.get(key) is flight:
            del self._flights[key]

    def __len__(self) -> int:
        return len(self._flights)
