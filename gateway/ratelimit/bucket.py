"""The bucket arithmetic, shared by every store: GCRA, the token bucket written as one number.

A bucket is its "theoretical arrival time" (TAT): the moment it will be full again. A full
bucket has TAT <= now, so a bucket that is not stored at all is full: stores may forget any
bucket whose TAT has passed. Taking a token moves TAT one interval (per / limit) later; the
take is refused when that would put TAT more than `burst` intervals ahead of now. This admits
exactly `burst` requests at once and `limit` per `per` after that, like a bucket of `burst`
tokens refilled at `limit / per`, with one integer stored instead of a count and a time.

All times are integer microseconds, so a burst of N takes is exactly N intervals (no float
drift at the edge); Redis' Lua runs the same arithmetic in doubles, exact below 2**53.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config.model import RateLimitPolicy

Clock = Callable[[], int]  # microseconds on a clock that never goes back


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass(frozen=True, slots=True)
class Decision:
    """What one check decided, with what the rate-limit headers report."""

    allowed: bool
    remaining: int  # tokens left after this request
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until a refused request would be admitted; 0 when allowed
    checked: bool = True  # False: the store could not answer and the request was let through


UNCHECKED = Decision(True, 0, 0.0, 0.0, checked=False)


def take(tat: int | None, now: int, policy: RateLimitPolicy) -> tuple[int, Decision]:
    """Take one token from the bucket `tat` (None: never seen, full): its new TAT and the
    decision. A refused take leaves the bucket as it was."""
    if tat is None or tat < now:
        tat = now
    ahead = tat + policy.interval_us - now
    if ahead > policy.capacity_us:
        return tat, decided(False, tat - now, policy)
    return tat + policy.interval_us, decided(True, ahead, policy)


def decided(allowed: bool, ahead_us: int, policy: RateLimitPolicy) -> Decision:
    """The Decision for a take that left the bucket's TAT `ahead_us` after now (for a refused
    take: where it already was). The Redis store gets `ahead_us` back from its script."""
    if allowed:
        remaining = (policy.capacity_us - ahead_us) // policy.interval_us
        return Decision(True, remaining, ahead_us / 1e6, 0.0)
    retry_us = ahead_us + policy.interval_us - policy.capacity_us
    return Decision(False, 0, ahead_us / 1e6, retry_us / 1e6)
