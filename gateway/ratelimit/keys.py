"""Whose bucket a request takes from, and the headers that report it (CONTRACT §9).

Keys, decided per route at build time:
  ip           the client address after trusted_proxies (`Exchange.client`)
  consumer     the authenticated consumer; anonymous requests fall back to the client address
  header:NAME  the value of request header NAME; a request without it falls back to the client
               address (so leaving the header out never escapes the limit)
Each subject carries what it is ("ip:", "consumer:", "header:") so a consumer named like an
address never shares that address's bucket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Final

from multidict import istr

from gateway.config.model import RateLimitPolicy
from gateway.http.exchange import Exchange
from gateway.ratelimit.bucket import Decision

Subject = Callable[[Exchange, Mapping[str, str]], str]  # (exchange, request headers) -> key

RATELIMIT_LIMIT: Final = istr("RateLimit-Limit")
RATELIMIT_REMAINING: Final = istr("RateLimit-Remaining")
RATELIMIT_RESET: Final = istr("RateLimit-Reset")
RATELIMIT_POLICY: Final = istr("RateLimit-Policy")
RETRY_AFTER: Final = istr("Retry-After")


def subject_of(key: str) -> Subject:
    """The function that names a request's bucket for the route's `key`."""
    if key == "consumer":
        return _consumer
    if key.startswith("header:"):
        name = istr(key.removeprefix("header:"))

        def header(exchange: Exchange, headers: Mapping[str, str]) -> str:
            value = headers.get(name)
            return "ip:" + exchange.client if value is None else "header:" + value

        return header
    return _ip


def key_of(bucket: str, key: str) -> Subject:
    """The whole bucket key of a request on a route whose own part is `bucket`: that, then the
    subject. The default key (`ip`) is one concatenation, its prefix joined once."""
    if key != "ip":
        subject = subject_of(key)
        return lambda exchange, headers: bucket + subject(exchange, headers)
    ip = bucket + "ip:"
    return lambda exchange, headers: ip + exchange.client


def _ip(exchange: Exchange, headers: Mapping[str, str]) -> str:
    return "ip:" + exchange.client


def _consumer(exchange: Exchange, headers: Mapping[str, str]) -> str:
    consumer = exchange.consumer
    return "consumer:" + consumer if consumer else "ip:" + exchange.client


def policy_text(policy: RateLimitPolicy) -> str:
    """RateLimit-Policy: `100;w=60`, plus `;burst=N` when the bucket holds other than `limit`."""
    window = f"{policy.per:g}" if policy.per < 1 else str(math.ceil(policy.per))
    burst = f";burst={policy.burst}" if policy.burst != policy.limit else ""
    return f"{policy.limit};w={window}{burst}"


class HeaderMaker:
    """The rate-limit headers of one route: the fixed ones made once, two values per request.
    RateLimit-Limit is the bucket's size (`burst`), so Remaining never exceeds it.

    A take from a full bucket (a key that stays under its limit: most of them, most of the
    time) always answers one interval (`full_answer`), so its headers are made once too
    (`full`)."""

    __slots__ = ("_capacity", "_interval", "_limit", "_policy", "full", "full_answer")

    def __init__(self, policy: RateLimitPolicy) -> None:
        self._limit = (RATELIMIT_LIMIT, str(policy.burst))
        self._policy = (RATELIMIT_POLICY, policy_text(policy))
        self._interval, self._capacity = policy.interval_us, policy.capacity_us
        self.full_answer = policy.interval_us
        self.full = self._admitted(policy.interval_us)

    def headers(self, decision: Decision) -> tuple[tuple[str, str], ...]:
        reset = decision.reset
        whole = int(reset)  # ceil for the non-negative reset, without math.ceil's call
        return (
            self._limit,
            (RATELIMIT_REMAINING, str(decision.remaining)),
            (RATELIMIT_RESET, str(whole if whole == reset else whole + 1)),
            self._policy,
        )

    def admitted(self, answer: int) -> tuple[tuple[str, str], ...]:
        """`headers` for an admitted take's signed answer (> 0: microseconds to the bucket's
        TAT), in integers: the same values, without making a Decision first."""
        return self.full if answer == self.full_answer else self._admitted(answer)

    def _admitted(self, answer: int) -> tuple[tuple[str, str], ...]:
        return (
            self._limit,
            (RATELIMIT_REMAINING, str((self._capacity - answer) // self._interval)),
            (RATELIMIT_RESET, str(-(-answer // 1_000_000))),  # whole seconds, rounded up
            self._policy,
        )


def retry_after(decision: Decision) -> str:
    """Whole seconds, rounded up and at least 1: a client that waits that long is admitted."""
    return str(max(1, math.ceil(decision.retry_after)))
