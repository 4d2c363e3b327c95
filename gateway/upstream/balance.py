"""Choosing a target: smooth weighted round robin (nginx's algorithm) and least connections.

A balancer sees only the targets that may take traffic now (healthy, circuit not open, not
already tried by this request); `upstream.Service` filters them. A target left out keeps its
round-robin `current_weight` untouched, as nginx does: every pick adds the candidates' weights
and takes their sum back from the winner, so the current weights of all targets always sum
to zero and stay bounded, and a target that comes back gets its share again within about a
round instead of a flood or a drought.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, assert_never

from gateway.config.model import Balance

if TYPE_CHECKING:
    from gateway.upstream.service import Target


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Target]) -> Target: ...


class RoundRobin:
    """Smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst of five."""

    def pick(self, candidates: Sequence[Target]) -> Target:
        if len(candidates) == 1:  # adding its weight and taking it back changes nothing
            return candidates[0]
        total = 0
        best = candidates[0]
        for target in candidates:
            target.current_weight += target.config.weight
            total += target.config.weight
            if target.current_weight > best.current_weight:
                best = target
        best.current_weight -= total
        return best


class LeastConn:
    """Fewest requests in flight relative to weight; ties rotate so equal targets share.

    `Target.in_flight` counts a request from its send until its response is released (body
    streamed out or the client gone), so a target that hangs keeps its count and is avoided."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Target]) -> Target:
        self._turn += 1
        count = len(candidates)
        best = candidates[self._turn % count]
        for i in range(count):
            target = candidates[(self._turn + i) % count]
            if target.in_flight * best.config.weight < best.in_flight * target.config.weight:
                best = target
        return best


def make_balancer(policy: Balance) -> Balancer:
    match policy:
        case "round_robin":
            return RoundRobin()
        case "least_conn":
            return LeastConn()
        case _:
            assert_never(policy)
