"""The response cache as a request/response stage (CONTRACT §10).

`on_request` runs before the body is read: a fresh entry answers at once (HIT, or 304 for a
matching If-None-Match / If-Modified-Since); otherwise the request goes on (MISS), after
waiting for another request of the same key that is already upstream (coalesce.py).
`on_response` tees a storable response: the client gets each chunk as it arrives, and the
entry is written once the body completed within `max_object_bytes` (larger bodies stream on,
uncached, never held whole). A successful POST, PUT, PATCH or DELETE drops its path and parent
collection before its answer goes out. `on_error` answers an upstream failure from a stale
entry within `stale_if_error` (STALE). Every answer of a cached route carries X-Cache.

The decisions are in gateway/cache/policy.py; storage and invalidation in gateway/cache/.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.cache import policy
from gateway.cache.coalesce import MAX_WAIT_SECONDS, Coalescer, Flight
from gateway.cache.invalidate import Invalidator
from gateway.cache.policy import Entry, Freshness
from gateway.cache.store import CacheStore
from gateway.config.model import CachePolicy, RouteConfig
from gateway.http.exchange import Exchange

X_CACHE: Final = istr("X-Cache")
AGE: Final = istr("Age")
HIT: Final = ((X_CACHE, "HIT"),)
MISS: Final = ((X_CACHE, "MISS"),)
BYPASS: Final = ((X_CACHE, "BYPASS"),)
STALE: Final = ((X_CACHE, "STALE"),)
STALE_ON_STATUS: Final = frozenset({500, 502, 503, 504})  # upstream failures answered stale


@dataclass(slots=True)
class UpstreamResponse:
    """Stand-in for the phase pipeline's type (gateway/http/pipeline.py, coming): what came
    back from upstream, or what a stage answers instead; `body` streams."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    body: AsyncIterator[bytes]


async def _once(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body


@dataclass(slots=True)
class _Notes:
    """What on_request leaves for on_response / on_error (in exchange.cache_state)."""

    parts: tuple[str, ...]
    headers: CIMultiDictProxy[str]  # the request's: Vary values are read from them
    head: bool  # a HEAD: answered from a GET's entry, never stored
    generation: int = -1  # the file's when looked up: a store after a drop is refused
    stale: Entry | None = None  # usable for stale_if_error
    key: str = ""  # the coalescing key
    flight: Flight | None = None  # set when this request leads for its key


class CacheStage:
    """One cached route's stage. `store`, `coalescer` and `invalidator` are the process's."""

    def __init__(
        self,
        route: RouteConfig,
        store: CacheStore,
        coalescer: Coalescer,
        invalidator: Invalidator,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert route.cache is not None
        self.rule: CachePolicy = route.cache
        self.store = store
        self.coalescer = coalescer
        self.invalidator = invalidator
        self.clock = clock
        t = route.timeouts
        self.wait = t.total or ((t.connect or 0) + (t.read or 0)) or MAX_WAIT_SECONDS

    async def on_request(
        self, exchange: Exchange, request: web.BaseRequest
    ) -> UpstreamResponse | None:
        method = request.method
        if method in policy.UNSAFE_METHODS:
            exchange.cache_state = _WRITE  # on_response invalidates
            self._mark(exchange, "BYPASS", BYPASS)
            return None
        headers = request.headers
        req = policy.view_request(method, headers)
        if policy.bypass_reason(req, self.rule, exchange.consumer) is not None:
            self._mark(exchange, "BYPASS", BYPASS)
            return None
        parts = policy.base_key(
            exchange.path + exchange.query, self.rule, exchange.consumer, headers
        )
        notes = _Notes(parts, headers, method == "HEAD")
        exchange.cache_state = notes
        found = await self.store.lookup(exchange.path, parts, headers)
        notes.generation = found.generation
        now = self.clock()
        entry = found.entry
        if entry is not None and not req.revalidate and entry.fresh(now):
            return self._hit(exchange, request, entry, now)
        if entry is not None and entry.usable_stale(now):
            notes.stale = entry
        if method == "GET" and not req.revalidate:  # HEAD never stores; no-cache goes up
            notes.key = policy.digest(exchange.path, parts)
            flight = self.coalescer.lead(notes.key, self.wait)
            if flight is None:
                if await self.coalescer.wait(notes.key, self.wait):
                    found = await self.store.lookup(exchange.path, parts, headers)
                    now = self.clock()
                    if found.entry is not None and found.entry.fresh(now):
                        return self._hit(exchange, request, found.entry, now)
                notes.generation = found.generation
            else:
                notes.flight = flight
        self._mark(exchange, "MISS", MISS)
        return None

    async def on_response(self, exchange: Exchange, up: UpstreamResponse) -> UpstreamResponse:
        notes = exchange.cache_state
        if not isinstance(notes, _Notes):
            if notes is _WRITE and up.status < 400:
                await self.invalidator.paths(list(policy.invalidated_paths(exchange.path)))
            return up
        if up.status in STALE_ON_STATUS and notes.stale is not None:
            await _close(up.body)
            return self._stale(exchange, notes)
        headers = up.headers
        cache_control = headers.getall("Cache-Control", ())
        vary = policy.vary_names(headers.getall("Vary", ()))
        length = headers.get("Content-Length")
        now = self.clock()
        fresh = policy.freshness(headers, cache_control, self.rule, now)
        if (
            notes.head
            or policy.storable(up.status, headers, cache_control) is not None
            or vary is None
            or (length is not None and not _fits(length, self.rule.max_object_bytes))
            or fresh.lifetime - fresh.initial_age <= 0
        ):
            self._finish(notes, False)
            return up
        up.body = self._tee(notes, exchange.path, up, up.body, vary, fresh, now)
        return up

    async def on_error(self, exchange: Exchange, error: Exception) -> UpstreamResponse | None:
        """The upstream failed (no response): a stale entry answers within stale_if_error."""
        notes = exchange.cache_state
        if not isinstance(notes, _Notes):
            return None
        self._finish(notes, False)
        if notes.stale is None or not notes.stale.usable_stale(self.clock()):
            return None
        return self._stale(exchange, notes)

    def _mark(self, exchange: Exchange, result: str, header: tuple[tuple[istr, str], ...]) -> None:
        exchange.cache = result
        exchange.response_headers += header

    def _hit(
        self, exchange: Exchange, request: web.BaseRequest, entry: Entry, now: float
    ) -> UpstreamResponse:
        notes = exchange.cache_state
        if isinstance(notes, _Notes) and notes.flight is not None:
            self._finish(notes, False)
        self._mark(exchange, "HIT", HIT)
        if policy.not_modified(entry, request.headers):
            kept = [(n, v) for n, v in entry.headers if n.lower() in policy.NOT_MODIFIED_KEEP]
            headers = CIMultiDict(kept)
            headers[AGE] = str(entry.age(now))
            return UpstreamResponse(304, "Not Modified", headers, _once(b""))
        return self._answer(entry, now, request.method == "HEAD")

    def _stale(self, exchange: Exchange, notes: _Notes) -> UpstreamResponse:
        assert notes.stale is not None
        exchange.cache = "STALE"
        exchange.response_headers = (
            *(h for h in exchange.response_headers if h[0] != X_CACHE),
            *STALE,
        )
        return self._answer(notes.stale, self.clock(), notes.head)

    def _answer(self, entry: Entry, now: float, head: bool) -> UpstreamResponse:
        headers = CIMultiDict(entry.headers)
        headers[AGE] = str(entry.age(now))
        headers["Content-Length"] = str(len(entry.body))
        return UpstreamResponse(
            entry.status, entry.reason, headers, _once(b"" if head else entry.body)
        )

    async def _tee(
        self,
        notes: _Notes,
        path: str,
        up: UpstreamResponse,
        source: AsyncIterator[bytes],
        vary: tuple[str, ...],
        fresh: Freshness,
        now: float,
    ) -> AsyncIterator[bytes]:
        """Each chunk goes on as it arrives; a copy is kept while the body fits the cap."""
        kept: list[bytes] | None = []
        size, limit = 0, self.rule.max_object_bytes
        stored = False
        try:
            async for chunk in source:
                if kept is not None:
                    size += len(chunk)
                    if size > limit:
                        kept = None  # too big: stream on, hold nothing
                    else:
                        kept.append(chunk)
                yield chunk
            if kept is not None:
                entry = policy.make_entry(
                    up.status, up.reason, up.headers.items(), up.headers, b"".join(kept),
                    fresh, self.rule, now,
                )  # fmt: skip
                stored = await self.store.put(
                    path, notes.parts, vary, notes.headers, entry, notes.generation
                )
        finally:
            self._finish(notes, stored)

    def _finish(self, notes: _Notes, stored: bool) -> None:
        if notes.flight is not None:
            self.coalescer.finish(notes.key, notes.flight, stored)
            notes.flight = None


_WRITE: Final = object()  # exchange.cache_state of a write on a route with the stage


class InvalidateStage:
    """On a route that does not cache (when some route does): its successful writes still drop
    the entries of their path and parent collection, before the answer goes out."""

    def __init__(self, invalidator: Invalidator) -> None:
        self.invalidator = invalidator

    async def on_request(
        self, exchange: Exchange, request: web.BaseRequest
    ) -> UpstreamResponse | None:
        if request.method in policy.UNSAFE_METHODS:
            exchange.cache_state = _WRITE
        return None

    async def on_response(self, exchange: Exchange, up: UpstreamResponse) -> UpstreamResponse:
        if exchange.cache_state is _WRITE and up.status < 400:
            await self.invalidator.paths(list(policy.invalidated_paths(exchange.path)))
        return up


def _fits(length: str, limit: int) -> bool:
    return length.isdigit() and int(length) <= limit


async def _close(body: AsyncIterator[bytes]) -> None:
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()
