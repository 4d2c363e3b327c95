"""The per-process store: every bucket in a dict, bounded however many keys clients send.

Buckets live in one ordered table per bucket shape (interval, capacity), least recently used
first. A bucket untouched for `capacity` is full again, and a full bucket is as good as absent,
so each new key first drops the full buckets at the front of every table: what stays is only
what was used within the last `burst` intervals. A hard cap (`max_keys`, default 100 000)
bounds even a client that sprays fresh keys faster than buckets refill; at the cap the least
recently used bucket goes (that key starts again full: the cap errs towards admitting).
Exact under concurrency: a take is a plain call that runs to completion on the event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from gateway.config.model import RateLimitPolicy
from gateway.ratelimit.bucket import Clock, Decision, decided, monotonic_us

DEFAULT_MAX_KEYS: Final = 100_000

Taker = Callable[[str], int]  # bucket key -> the take's signed answer (bucket.py)


class MemoryStore:
    def __init__(self, clock: Clock = monotonic_us, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._tables: dict[tuple[int, int], OrderedDict[str, int]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        return self.take(key, policy)

    def take(self, key: str, policy: RateLimitPolicy) -> Decision:
        return decided(self.taker(policy)(key), policy)

    def taker(self, policy: RateLimitPolicy) -> Taker:
        """The take for buckets of `policy`, its table looked up once: what the stage calls per
        request (a plain call, no coroutine, no Decision). It is bucket.py's `step` inline: a
        refused take leaves the bucket as it is, so only an admitted one stores its TAT."""
        interval, capacity = policy.interval_us, policy.capacity_us
        shape = (interval, capacity)
        table = self._tables.get(shape)
        if table is None:
            table = self._tables[shape] = OrderedDict()
        clock, move_to_end = self._clock, table.move_to_end
        # The default clock read in place: monotonic_us's own frame costs as much as a take.
        ns = time.monotonic_ns if clock is monotonic_us else None

        def take(key: str) -> int:
            now = ns() // 1000 if ns is not None else clock()
            tat = table.get(key)
            if tat is None:
                self._make_room(table, now)
                self._size += 1
                tat = now
            else:
                move_to_end(key)
                if tat < now:
                    tat = now
            ahead = tat + interval - now
            if ahead > capacity:
                return now - tat
            table[key] = tat + interval
            return ahead

        return take

    def evict_idle(self) -> None:
        """Drop every bucket that is full again (new keys do this as they come)."""
        now = self._clock()
        for table in self._tables.values():
            self._drop_full(table, now)

    def _make_room(self, table: OrderedDict[str, int], now: int) -> None:
        for each in self._tables.values():
            self._drop_full(each, now)
        if self._size >= self._max_keys:
            victim = table if table else max(self._tables.values(), key=len)
            victim.popitem(last=False)
            self._size -= 1

    def _drop_full(self, table: OrderedDict[str, int], now: int) -> None:
        while table:
            key = next(iter(table))
            if table[key] > now:
                return
            del table[key]
            self._size -= 1

    async def close(self) -> None:
        """Nothing to release."""
