"""Passive health per target (a circuit breaker) and the retry budget of a service.

    closed --N consecutive failures--> open --open_for elapsed, next pick--> half-open
      ^                                  ^                                      |
      '---------- trial succeeds --------+------------ trial fails -------------'

A failure is a connect error, a reset or timeout before the response, or a 502/503/504.
While half-open exactly one request (the trial) is let through; its verdict decides. A trial
that ends without a verdict (the client left, the gateway cut the request body) hands the
trial to the next request, and so does one still undecided after another `open_for` (a
caller that never reported back must not keep the target out for good). Answers to requests
sent before the circuit opened are ignored while it is open: only a trial closes it. Both
classes take a `Clock`, so tests step time instead of sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import Final

from gateway.model import CircuitBreakerConfig, RetryBudgetConfig

Clock = Callable[[], float]  # seconds, monotonic
upstream_log = logging.getLogger("gateway.upstream")


class Circuit(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """The circuit state of one target; `state` and `consecutive_failures` are observable."""

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_trial",
        "_trial_at",
        "config",
        "name",
        "state",
    )

    def __init__(
        self, name: str, config: CircuitBreakerConfig, clock: Clock = time.monotonic
    ) -> None:
        self.name = name  # the target label ("inventory#0") for logs: never the address
        self.config = config
        self.state = Circuit.CLOSED
        self._clock = clock
        self._failures = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._trial = False  # the half-open trial request is in flight
        self._trial_at = 0.0  # when it was claimed

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allows(self) -> bool:
        """May a request go to this target now? Does not claim the half-open trial."""
        if self.state is Circuit.CLOSED:
            return True
        if self.state is Circuit.OPEN:
            return self._clock() - self._opened_at >= self.config.open_for
        return not self._trial or self._clock() - self._trial_at >= self.config.open_for

    def claim(self) -> bool:
        """The balancer chose this target. True when this request is the half-open trial."""
        if self.state is Circuit.OPEN and self.allows():
            self._move(Circuit.HALF_OPEN)
        if self.state is Circuit.HALF_OPEN and self.allows():
            self._trial, self._trial_at = True, self._clock()
            return True
        return False

    def success(self) -> None:
        """The target answered with something other than 502/503/504."""
        if self.state is Circuit.CLOSED:
            self._failures = 0
        elif self.state is Circuit.HALF_OPEN:
            self._move(Circuit.CLOSED)
        # OPEN: a late answer to a request sent before the circuit opened; the trial decides.

    def failure(self) -> None:
        """The target failed (see module docstring)."""
        if self.state is Circuit.CLOSED:
            self._failures += 1
            if self._failures >= self.config.failures:
                self._open()
        elif self.state is Circuit.HALF_OPEN:
            self._open()

    def abandon(self, trial: bool) -> None:
        """A request ended with no verdict on the target; a trial passes to the next request."""
        if trial and self.state is Circuit.HALF_OPEN:
            self._trial = False

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a trial through (0 when it already would)."""
        if self.state is not Circuit.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_for - self._clock())

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move(Circuit.OPEN)

    def _move(self, state: Circuit) -> None:
        level = logging.WARNING if state is Circuit.OPEN else logging.INFO
        upstream_log.log(level, "circuit %s: %s -> %s", self.name, self.state.name, state.name)
        self.state = state
        self._failures = 0
        self._trial = False


_BUCKETS: Final = 10


class RetryBudget:
    """Retries allowed over a sliding window: `min_retries + ratio * requests`, as in
    Finagle's and Linkerd's retry budgets. Each service has one; only requests to services
    with `retries` configured are counted."""

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
        if sum(self._retries) + 1 > self.allowed():
            return False
        self._retries[slot] += 1
        return True

    def allowed(self) -> float:
        """Retries the current window allows in all (spent ones included)."""
        self._advance()
        return self.config.min_retries + self.config.ratio * sum(self._requests)

    def _advance(self) -> int:
        epoch = int(self._clock() / self._width)
        stale = min(epoch - self._epoch, _BUCKETS)
        for i in range(1, stale + 1):
            slot = (self._epoch + i) % _BUCKETS
            self._requests[slot] = self._retries[slot] = 0
        self._epoch = epoch
        return epoch % _BUCKETS
