"""Passive health per target: a circuit breaker and the retry budget of a service.

closed --N consecutive failures--> open --open_for elapsed--> half-open --trial ok--> closed
                                    ^------------------------- trial fails ------------'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import Final

from gateway.model import CircuitBreakerConfig, RetryBudgetConfig

Clock = Callable[[], float]
upstream_log = logging.getLogger("gateway.upstream")


class Circuit(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    __slots__ = ("_clock", "_failures", "_opened_at", "_trial", "config", "name", "state")

    def __init__(self, name: str, config: CircuitBreakerConfig, clock: Clock = time.monotonic):
        self.name = name  # "service target-index" for logs: never the address
        self.config = config
        self.state = Circuit.CLOSED
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False  # a half-open trial request is in flight

    def allows(self) -> bool:
        """May a request go to this target now? Does not claim the half-open trial."""
        if self.state is Circuit.CLOSED:
            return True
        if self.state is Circuit.OPEN:
            return self._clock() - self._opened_at >= self.config.open_for
        return not self._trial

    def claim(self) -> None:
        """The balancer chose this target: an open circuit past its time starts its one trial."""
        if self.state is Circuit.OPEN:
            self._move(Circuit.HALF_OPEN)
        if self.state is Circuit.HALF_OPEN:
            self._trial = True

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        if self.state is not Circuit.CLOSED:
            self._move(Circuit.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        self._trial = False
        if self.state is Circuit.HALF_OPEN or (
            self.state is Circuit.CLOSED and self._failures >= self.config.failures
        ):
            self._opened_at = self._clock()
            self._move(Circuit.OPEN)

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a trial through (0 when it already would)."""
        if self.state is not Circuit.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_for - self._clock())

    def _move(self, state: Circuit) -> None:
        level = logging.WARNING if state is Circuit.OPEN else logging.INFO
        upstream_log.log(level, "circuit %s: %s -> %s", self.name, self.state.name, state.name)
        self.state = state


_BUCKETS: Final = 10


class RetryBudget:
    """Retries allowed as a share of requests over a sliding window (Finagle/Linkerd style)."""

    __slots__ = ("_clock", "_epoch", "_requests", "_retries", "_width", "config")

    def __init__(self, config: RetryBudgetConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._width = config.window / _BUCKETS
        self._epoch = int(clock() / self._width)
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS

    def record_request(self) -> None:
        self._requests[self._advance()] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget, or say no."""
        slot = self._advance()
        allowed = max(self.config.min_retries, self.config.ratio * sum(self._requests))
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def _advance(self) -> int:
        epoch = int(self._clock() / self._width)
        stale = min(epoch - self._epoch, _BUCKETS)
        for i in range(1, stale + 1):
            slot = (self._epoch + i) % _BUCKETS
            self._requests[slot] = self._retries[slot] = 0
        self._epoch = epoch
        return epoch % _BUCKETS
