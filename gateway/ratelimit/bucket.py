"""The bucket arithmetic, shared by every store: GCRA, the token bucket written as one number.

A bucket is its "theoretical arrival time" (TAT): the moment it will be full again. A full
bucket has TAT <= now, so a bucket that is not stored at all is full: stores may forget any
bucket whose TAT has passed. Taking a token moves TAT one interval (per / limit) later; the
take is refused when that would put TAT more than `burst` intervals ahead of now. This admits
exactly `burst` requests at once and `limit` per `per` after that, like a bucket of `burst`
tokens refilled at `limit / per`, with one integer stored instead of a count and a time.

All times are integer microseconds, so a burst of N takes is exactly N intervals (no float
drift at the edge); Redis' Lua runs the same arithmetic in doubles, exact below 2**53.

A take answers with one signed integer, the same from every store (Redis' script too):
  > 0   admitted; the bucket's TAT is now that many microseconds ahead
  <= 0  refused; the bucket is as it was, its TAT minus that many microseconds ahead
(an admitted take leaves the TAT at least one interval ahead, so 0 is never an admission).
The stage reads the headers straight from it; `decided` makes the Decision stores return.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.config.model import RateLimitPolicy

Clock = Callable[[], int]  # microseconds on a clock that never goes back


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class Decision(NamedTuple):
    """What one check decided, with what the rate-limit headers report. A tuple, not a frozen
    dataclass: made once per check, and a frozen dataclass' __init__ costs several times more."""

    allowed: bool
    remaining: int  # tokens left after this request
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until a refused request would be admitted; 0 when allowed
    checked: bool = True  # False: the store could not answer and the request was let through


UNCHECKED = Decision(True, 0, 0.0, 0.0, checked=False)
_new = tuple.__new__  # Decision(...) without NamedTuple's Python-level __new__


def step(tat: int | None, now: int, interval: int, capacity: int) -> tuple[int, int]:
    """Take one token from the bucket `tat` (None: never seen, full) at `now`, for a policy of
    `interval` microseconds per token and `capacity` = burst * interval: the TAT to store and
    the signed answer (see above)."""
    if tat is None or tat < now:
        tat = now
    ahead = tat + interval - now
    if ahead > capacity:
        return tat, now - tat
    return tat + interval, ahead


def take(tat: int | None, now: int, policy: RateLimitPolicy) -> tuple[int, Decision]:
    """`step` with the policy's numbers, and its answer as a Decision."""
    tat, answer = step(tat, now, policy.interval_us, policy.capacity_us)
    return tat, decided(answer, policy)


def decided(answer: int, policy: RateLimitPolicy) -> Decision:
    """The Decision for a take's signed answer."""
    if answer > 0:
        remaining = (policy.capacity_us - answer) // policy.interval_us
        return _new(Decision, (True, remaining, answer / 1e6, 0.0, True))
    ahead = -answer
    retry_us = ahead + policy.interval_us - policy.capacity_us
    return _new(Decision, (False, 0, ahead / 1e6, retry_us / 1e6, True))
