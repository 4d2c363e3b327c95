"""The per-request record that stages write and the access log reads, and the one hook that
applies its response headers just before any response (streamed or problem+json) is sent.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, istr

from gateway.config.model import HeaderRules

if TYPE_CHECKING:
    from gateway.http.pipeline import Prepared

X_REQUEST_ID: Final = istr("X-Request-ID")
TRACEPARENT: Final = istr("traceparent")
_SANE_ID: Final = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(slots=True, eq=False)
class UpstreamCall:
    """One call to a service on a request's behalf (the forward, an auth sub-request, an
    aggregate part, a compose step): what the access line lists and the metrics count.
    `Service.send` makes it; nothing else about the request is written by the upstream layer."""

    service: str
    kind: str = "forward"  # forward | websocket | auth | part | call
    target: str = ""  # the label of the target tried last ("svc#0"), never its address
    attempts: int = 0  # requests sent to targets: 1 plus retries
    ms: float | None = None  # until the response head, retries included; None: no answer
    status: int = 0  # the upstream's status; 0 when none came
    outcome: str = ""  # "ok" once a head came; else the failure (timeout, unavailable, ...)
    started: float = 0.0  # perf_counter when the call began; 0: not recorded (tracing reads it)


@dataclass(slots=True)  # not frozen: a frozen one costs three times as much to make
class TraceSpans:
    """The span ids of a request that tracing records (gateway/ops/tracing.py chose them
    before anything went upstream, so the traceparent sent there names the client span)."""

    parent: str  # the incoming traceparent's span id; "" when the trace began here
    server: str  # the server span's id
    upstream: str  # the forward call's client span id, in the traceparent sent upstream


@dataclass(slots=True)
class Exchange:
    """What the gateway learned and decided about one request."""

    request_id: str
    traceparent: str
    started: float = field(default_factory=time.perf_counter)
    path: str = "/"  # normalized request path, without the query
    query: str = ""  # raw query string including its '?', byte for byte; "" when absent
    client: str = ""  # the client address, after trusted-proxy resolution
    forwarded_for: str | None = None  # X-Forwarded-For from a trusted proxy, to extend
    route: str = ""  # "routes.N", "" when no route matched
    service: str = ""
    consumer: str = ""
    cache: str = ""  # HIT | MISS | BYPASS | STALE; "" when the route does not cache
    cache_state: object = None  # the cache stage's notes between its request and response phases
    bytes_out: int = 0  # body bytes relayed to the client (streamed responses)
    calls: tuple[UpstreamCall, ...] = ()  # every upstream call made for it, in order
    # Set by the `Expect: 100-continue` handler, which runs the request phase early: the
    # route, and the phase's answer or refusal (dispatch then goes on from there).
    prepared: Prepared | None = None
    body: AsyncIterable[bytes] | None = None  # replaces the request body going up (limits)
    body_error: Exception | None = None  # why that body stopped early: not the target's fault
    # Immutable defaults: a stage that adds replaces the value (creating an Exchange per
    # request stays cheap, and most routes add nothing).
    upstream_set: tuple[tuple[str, str], ...] = ()  # headers to send up
    upstream_remove: frozenset[str] = frozenset()  # lower-case names not to send
    response_headers: tuple[tuple[str, str], ...] = ()  # added to the answer
    response_remove: frozenset[str] = frozenset()  # dropped from it before those are added
    response_rules: HeaderRules | None = None  # the route's response_headers transform
    from_upstream: bool = False  # the response is a relayed upstream response
    upstream_had_server: bool = False
    upstream_had_type: bool = False
    trace: TraceSpans | None = None  # tracing on and this request sampled: its span ids

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    @property
    def main_call(self) -> UpstreamCall | None:
        """The first call: the forward on a proxied route (what `target` and `retries` of the
        access line describe)."""
        return self.calls[0] if self.calls else None

    def cut(self) -> Exception | None:
        """Why the request body was cut off by the gateway (a limit, a stall), if it was."""
        return self.body_error


class _RandomHex:
    """Random hex digits from os.urandom, read 4 KiB at a time (one system call per ~50
    requests instead of three per request)."""

    def __init__(self) -> None:
        self._pool = ""
        self._at = 0

    def take(self, digits: int) -> str:
        start, end = self._at, self._at + digits
        if end > len(self._pool):
            self._pool, start, end = os.urandom(4096).hex(), 0, digits
        self._at = end
        return self._pool[start:end]


_random = _RandomHex()
random_hex: Final = _random.take  # digits for new ids (tracing's span ids)
IDS_PER_DRAW: Final = 128  # (request id, traceparent) pairs made from one os.urandom call


def _fresh_ids() -> Iterator[tuple[str, str]]:
    """New request ids and traceparents (sampled), made IDS_PER_DRAW at a time: a request
    that brings neither takes the next pair, one C-level step."""
    digits = os.urandom(40 * IDS_PER_DRAW).hex()  # 80 digits a pair: 32 + 32 + 16
    return iter(
        [
            (digits[at : at + 32], f"00-{digits[at + 32 : at + 64]}-{digits[at + 64 : at + 80]}-01")
            for at in range(0, len(digits), 80)
        ]
    )


_ids: list[Iterator[tuple[str, str]]] = [iter(())]  # the pairs not taken yet


def start_exchange(request: web.BaseRequest) -> Exchange:
    """The request's Exchange (`exchange_for` its headers)."""
    return exchange_for(request.headers)


def exchange_for(headers: Mapping[str, str]) -> Exchange:
    """Keep a sane client request id and a valid traceparent, or make new ones (both from
    the pairs drawn ahead when both are new, as on most requests)."""
    request_id = headers.get(X_REQUEST_ID)
    parent = headers.get(TRACEPARENT)
    if request_id is None or not _SANE_ID.fullmatch(request_id):
        if parent is None or not _valid_traceparent(parent):
            pair = next(_ids[0], None)
            if pair is None:
                _ids[0] = fresh = _fresh_ids()
                pair = next(fresh)
            return Exchange(*pair)
        request_id = _random.take(32)
    elif parent is None or not _valid_traceparent(parent):
        digits = _random.take(48)
        parent = f"00-{digits[:32]}-{digits[32:]}-01"
    return Exchange(request_id, parent)


def _valid_traceparent(value: str) -> bool:
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != _ZERO_TRACE and match[2] != _ZERO_SPAN


EXCHANGE: Final = web.RequestKey("exchange", Exchange)


async def apply_exchange(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: runs after aiohttp's own header defaults, before headers are sent
    (the relay's responses call `apply_headers` themselves: http/relay.py)."""
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        apply_headers(exchange, response.headers)


def apply_headers(exchange: Exchange, headers: CIMultiDict[str]) -> None:
    """The Exchange's edits of a response's headers: X-Request-ID, aiohttp's defaults undone,
    then what stages added or removed and the route's response_headers rules."""
    headers[X_REQUEST_ID] = exchange.request_id
    if not exchange.upstream_had_server:
        headers.popall(hdrs.SERVER, None)  # never advertise aiohttp's name and version
    if exchange.from_upstream and not exchange.upstream_had_type:
        headers.popall(hdrs.CONTENT_TYPE, None)  # aiohttp's default; the upstream sent none
    for name in exchange.response_remove:
        headers.popall(name, None)
    if exchange.response_headers:
        headers.extend(exchange.response_headers)  # one call, not one add per header
    rules = exchange.response_rules
    if rules is not None:
        for name in rules.remove:
            headers.popall(name, None)
        for name, value in rules.set:
            headers[name] = value
