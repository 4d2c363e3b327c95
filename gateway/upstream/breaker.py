"""Passive health per target (a circuit breaker) and the retry budget of a service.

    closed --N consecutive failures--> open --open_for elapsed, next pick--> half-open
      ^                                  ^                                      |
      '---------- trial succeeds --------+------------ trial fails -------------'

A failure is a connect error, a reset or timeout before the response, or a 502/503/504.
While half-open exactly one request (the trial) is let through; its verdict decides. A trial
that ends without a verdict (the client left, the gateway cut the request body) hands the
trial to the next request, and so does one still undecided after another `open_for` (a
caller that never reported back must not keep the target out for good).

Only answers about the current state count: `claim()` hands each request a ticket (the
breaker's epoch, which every state change and every trial moves on), and `success()` and
`failure()` take it back. A late answer to a request sent before the circuit opened is
ignored while it is open, and while half-open only the trial's ticket decides, so a late
failure cannot re-open a half-open circuit and a late success cannot close it. `AlwaysClosed`
is the default breaker of a service with one target: it never ejects its only target (as
nginx never marks a lone server down). Both classes take a `Clock`, so tests step time
instead of sleeping.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from typing import Final

from gateway.config.model import CircuitBreakerConfig, RetryBudgetConfig

Clock = Callable[[], float]  # seconds, monotonic
upstream_log = logging.getLogger("gateway.upstream")


class Circuit(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


Ticket = int  # what `claim()` hands a request and its verdict hands back (see module docstring)
_NO_VERDICT: Final = -1  # the ticket of a request the breaker did not let through (epochs >= 0)
NOT_LET_THROUGH: Final = _NO_VERDICT  # what `claim()` returns when the circuit says no


class CircuitBreaker:
    """The circuit state of one target; `state` and `consecutive_failures` are observable."""

    __slots__ = (
        "_clock",
        "_epoch",
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
        self._epoch = 0  # moves on at every state change and every trial: tickets are epochs
        self._failures = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._trial = False  # the half-open trial request is in flight (its ticket: _epoch)
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

    def claim(self) -> Ticket:
        """The balancer chose this target: the request's ticket for `success()`, `failure()`
        or `abandon()`. `is_trial(ticket)` says whether it is the half-open trial. When the
        circuit lets no request through (`allows()` is false) it is NOT_LET_THROUGH."""
        if self.state is Circuit.CLOSED:
            return self._epoch
        if self.state is Circuit.OPEN and self.allows():
            self._move(Circuit.HALF_OPEN)
        if self.state is Circuit.HALF_OPEN and self.allows():
            self._epoch += 1  # a trial passed on after open_for can no longer decide
            self._trial, self._trial_at = True, self._clock()
            return self._epoch
        return _NO_VERDICT  # not let through: nothing it says counts

    def is_trial(self, ticket: Ticket) -> bool:
        return self._trial and ticket == self._epoch and self.state is Circuit.HALF_OPEN

    def success(self, ticket: Ticket | None = None) -> None:
        """The target answered with something other than 502/503/504. Without a ticket the
        answer is taken as current (a caller that does not keep one)."""
        if ticket is not None and ticket != self._epoch:
            return  # sent before the last change: the state it speaks of is gone
        if self.state is Circuit.CLOSED:
            self._failures = 0
        elif self.state is Circuit.HALF_OPEN and (self._trial or ticket is None):
            self._move(Circuit.CLOSED)
        # OPEN: a late answer to a request sent before the circuit opened; the trial decides.

    def failure(self, ticket: Ticket | None = None) -> None:
        """The target failed (see module docstring)."""
        if ticket is not None and ticket != self._epoch:
            return
        if self.state is Circuit.CLOSED:
            self._failures += 1
            if self._failures >= self.config.failures:
                self._open()
        elif self.state is Circuit.HALF_OPEN and (self._trial or ticket is None):
            self._open()

    def abandon(self, ticket: Ticket) -> None:
        """A request ended with no verdict on the target; a trial passes to the next request."""
        if self.is_trial(ticket):
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
        self._epoch += 1
        self._failures = 0
        self._trial = False


class AlwaysClosed(CircuitBreaker):
    """The default breaker of a single-target service: failures are counted (observable) but
    never eject the only target, which would turn every route of the service into a 503
    for `open_for` while the target may well be answering again. An explicit
    `circuit_breaker:` on the service gets a real `CircuitBreaker`."""

    __slots__ = ()

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        super().__init__(name, CircuitBreakerConfig(), clock)

    def allows(self) -> bool:
        return True

    def claim(self) -> Ticket:
        return 0

    def success(self, ticket: Ticket | None = None) -> None:
        self._failures = 0

    def failure(self, ticket: Ticket | None = None) -> None:
        self._failures += 1

    def abandon(self, ticket: Ticket) -> None:
        pass


_BUCKETS: Final = 10


class RetryBudget:
    """Retries allowed over a sliding window: `min_retries + ratio * requests`, as in
    Finagle's and Linkerd's retry budgets. Each service has one; only requests to services
    with `retries` configured are counted.

    The budget is per process. With N workers each one sees about 1/N of the requests, so
    the ratio part already adds up to the configured share; the fixed `min_retries` is split
    (`workers`, from GATEWAY_WORKERS: see `worker_count`), so N workers together allow what
    one would, not N times as many retries against a target that is failing."""

    __slots__ = ("_clock", "_epoch", "_floor", "_requests", "_retries", "_width", "config")

    def __init__(
        self, config: RetryBudgetConfig, clock: Clock = time.monotonic, workers: int = 1
    ) -> None:
        self.config = config
        self._clock = clock
        self._floor = config.min_retries / max(workers, 1)  # this worker's share
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
        return self._floor + self.config.ratio * sum(self._requests)

    def _advance(self) -> int:
        epoch = int(self._clock() / self._width)
        stale = min(epoch - self._epoch, _BUCKETS)
        for i in range(1, stale + 1):
            slot = (self._epoch + i) % _BUCKETS
            self._requests[slot] = self._retries[slot] = 0
        self._epoch = epoch
        return epoch % _BUCKETS


WORKERS_ENV: Final = "GATEWAY_WORKERS"  # set by the supervisor of --workers N


def worker_count() -> int:
    """How many worker processes share this machine's traffic (1 unless supervised)."""
    value = os.environ.get(WORKERS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else 1
