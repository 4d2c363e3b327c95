"""The response cache as a request/response stage (CONTRACT §10).

`on_request` runs before the body is read: a fresh entry answers at once (HIT, or 304 for a
matching If-None-Match / If-Modified-Since), mostly as bytes encoded once per entry and sent
as they are (gateway/cache/wire.py), else through the relay; otherwise the request goes on
(MISS), after waiting for another request of the same key that is already upstream
(coalesce.py).
`on_response` tees a storable response: the client gets each chunk as it arrives, and the
entry is written once the body completed within `max_object_bytes` (larger bodies stream on,
uncached, never held whole). A successful POST, PUT, PATCH or DELETE drops its path and parent
collection before its answer goes out. `guard` wraps the route's action: an upstream failure
(or a 500/502/503/504) is answered from a stale entry within `stale_if_error` (STALE). Every
answer of a cached route carries X-Cache (through the Exchange, so problem+json ones too).

The decisions are in gateway/cache/policy.py; storage and invalidation in gateway/cache/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion
from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.cache import policy
from gateway.cache.coalesce import MAX_WAIT_SECONDS, Coalescer, Flight
from gateway.cache.invalidate import Invalidator
from gateway.cache.policy import Entry, Freshness
from gateway.cache.store import CacheStore, Found
from gateway.cache.wire import Wire
from gateway.config.model import CachePolicy, RouteConfig
from gateway.http.errors import UpstreamError
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Action, Answer, Body, LaneHit, UpstreamResponse

X_CACHE: Final = istr("X-Cache")
AGE: Final = istr("Age")
HIT: Final = ((X_CACHE, "HIT"),)
MISS: Final = ((X_CACHE, "MISS"),)
BYPASS: Final = ((X_CACHE, "BYPASS"),)
STALE: Final = ((X_CACHE, "STALE"),)
STALE_ON_STATUS: Final = frozenset({500, 502, 503, 504})  # upstream failures answered stale
ANSWERED: Final = frozenset({"HIT", "STALE"})  # exchange.cache when the answer is an entry
T = TypeVar("T")
_detached: set[asyncio.Task[Any]] = set()


def _finish_anyway(work: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """Run `work` to its end even if the request is cancelled meanwhile (a client that
    leaves the moment its last byte arrived): a store or a drop is never half done."""
    task = asyncio.get_running_loop().create_task(work)
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    return asyncio.shield(task)


@dataclass(slots=True)
class _Notes:
    """What on_request leaves for on_response and the guard (in exchange.cache_state)."""

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
        self.wire = Wire()  # this route's encoded heads
        t = route.timeouts
        self.wait = t.total or ((t.connect or 0) + (t.read or 0)) or MAX_WAIT_SECONDS

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
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
        path = exchange.path
        parts, found, hot, now = self._hot(exchange, req, headers)
        if hot is not None:  # the usual hit: no await, no notes
            return self._hit(exchange, request, hot, now)
        notes = _Notes(parts, headers, method == "HEAD")
        exchange.cache_state = notes
        if found is None:
            found = await self.store.lookup(path, parts, headers)
            now = self.clock()
        notes.generation = found.generation
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

    def _hot(
        self, exchange: Exchange, req: policy.RequestView, headers: CIMultiDictProxy[str]
    ) -> tuple[tuple[str, ...], Found | None, Entry | None, float]:
        """The key's parts, what the store holds in memory for it, that entry if it answers
        the request at once (fresh, and not to be revalidated), and the time now."""
        path = exchange.path
        parts = policy.base_key(path + exchange.query, self.rule, exchange.consumer, headers)
        found = self.store.hot(path, parts, headers)
        now = self.clock()
        hot = None if found is None else found.entry
        if hot is not None and (req.revalidate or not hot.fresh(now)):
            hot = None
        return parts, found, hot, now

    def lane_hit(
        self,
        exchange: Exchange,
        method: str,
        headers: CIMultiDictProxy[str],
        version: HttpVersion,
        keep_alive: bool,
    ) -> LaneHit | None:
        """`on_request` for the hit lane (servers/hitlane.py), which asks only when no stage
        before this one acts: the encoded answer where on_request would answer a hit at once
        (`_hit`) with the wire's bytes; None for anything else (a bypass, a miss, a 304, an
        entry the wire does not encode), which the lane leaves to the normal path."""
        if method in policy.UNSAFE_METHODS:
            return None
        req = policy.view_request(method, headers)
        if policy.bypass_reason(req, self.rule, exchange.consumer) is not None:
            return None
        _, _, hot, now = self._hot(exchange, req, headers)
        if hot is None or policy.not_modified(hot, headers):
            return None
        self._mark(exchange, "HIT", HIT)
        head_only = method == hdrs.METH_HEAD
        wire = self.wire.encode(exchange, hot, hot.age(now), version, head_only, keep_alive)
        return None if wire is None else LaneHit(wire, hot.status, len(hot.body))

    def guard(self, action: Action) -> Action:
        """The route's action, with stale_if_error on an upstream failure and the coalescing
        slot given back whatever happens."""

        async def guarded(
            request: web.Request, exchange: Exchange
        ) -> UpstreamResponse | web.StreamResponse:
            try:
                return await action(request, exchange)
            except UpstreamError:
                notes = exchange.cache_state
                if isinstance(notes, _Notes):
                    self._finish(notes, False)
                    if notes.stale is not None and notes.stale.usable_stale(self.clock()):
                        return self._stale(exchange, notes)
                raise
            except BaseException:
                notes = exchange.cache_state
                if isinstance(notes, _Notes):
                    self._finish(notes, False)
                raise

        return guarded

    async def on_response(self, exchange: Exchange, up: UpstreamResponse) -> UpstreamResponse:
        notes = exchange.cache_state
        if not isinstance(notes, _Notes):
            if notes is _WRITE and up.status < 400:
                await _finish_anyway(self.invalidator.paths(_dropped(exchange.path)))
            return up
        if exchange.cache in ANSWERED:  # the answer is an entry (a hit, or stale)
            return up
        if up.status in STALE_ON_STATUS and notes.stale is not None:
            self._finish(notes, False)
            if up.release is not None:
                up.release()
            return self._stale(exchange, notes)
        headers = CIMultiDict(up.headers)
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
        if isinstance(up.body, bytes):  # made whole by the action: stored at once if it fits
            if len(up.body) <= self.rule.max_object_bytes:
                await _finish_anyway(
                    self._store(exchange.path, notes, up, headers, up.body, vary, fresh, now)
                )
            self._finish(notes, False)
            return up
        tee = _Tee(self, exchange.path, notes, up, headers, vary, fresh, now)
        up.body, up.release = tee, tee.release
        return up

    def _mark(self, exchange: Exchange, result: str, header: tuple[tuple[istr, str], ...]) -> None:
        exchange.cache = result
        exchange.response_headers += header

    def _hit(
        self, exchange: Exchange, request: web.Request, entry: Entry, now: float
    ) -> UpstreamResponse | web.StreamResponse:
        notes = exchange.cache_state
        if isinstance(notes, _Notes):
            self._finish(notes, False)
        self._mark(exchange, "HIT", HIT)
        age = entry.age(now)
        if policy.not_modified(entry, request.headers):
            kept = [(n, v) for n, v in entry.headers if n.lower() in policy.NOT_MODIFIED_KEEP]
            kept.append((AGE, str(age)))
            return UpstreamResponse(304, kept, b"", reason="Not Modified")
        # Sent as it is when the entry's encoded head serves (cache/wire.py); else relayed.
        return self.wire.answer(request, exchange, entry, age) or self._answer(entry, age)

    def _stale(self, exchange: Exchange, notes: _Notes) -> UpstreamResponse:
        assert notes.stale is not None
        exchange.cache = "STALE"
        exchange.response_headers = (
            *(h for h in exchange.response_headers if h[0] != X_CACHE),
            *STALE,
        )
        return self._answer(notes.stale, notes.stale.age(self.clock()))

    @staticmethod
    def _answer(entry: Entry, age: int) -> UpstreamResponse:
        """The entry, whole: the relay sends Content-Length, and no body to a HEAD."""
        headers = [*entry.headers, (AGE, str(age))]
        return UpstreamResponse(entry.status, headers, entry.body, reason=entry.reason)

    async def _store(  # and give the coalescing slot back, saying whether it stored
        self,
        path: str,
        notes: _Notes,
        up: UpstreamResponse,
        headers: CIMultiDict[str],
        body: bytes,
        vary: tuple[str, ...],
        fresh: Freshness,
        now: float,
    ) -> bool:
        entry = policy.make_entry(
            up.status, up.reason or "", up.headers, headers, body, fresh, self.rule, now
        )
        stored = False
        try:
            stored = await self.store.put(
                path, notes.parts, vary, notes.headers, entry, notes.generation
            )
        finally:
            self._finish(notes, stored)
        return stored

    def _finish(self, notes: _Notes, stored: bool) -> None:
        if notes.flight is not None:
            self.coalescer.finish(notes.key, notes.flight, stored)
            notes.flight = None


class _Tee:
    """The response body as it arrives, for the relay; a copy is kept while it fits the cap
    and stored when the body is complete, before its end is handed on. With a Content-Length
    that is before the last bytes go out: a client that has them all may ask again at once
    (another worker included) and must find the entry."""

    __slots__ = ("_fresh", "_headers", "_kept", "_length", "_notes", "_now", "_path",
                 "_release", "_size", "_source", "_stage", "_storing", "_up", "_vary")  # fmt: skip

    def __init__(
        self,
        stage: CacheStage,
        path: str,
        notes: _Notes,
        up: UpstreamResponse,
        headers: CIMultiDict[str],
        vary: tuple[str, ...],
        fresh: Freshness,
        now: float,
    ) -> None:
        assert not isinstance(up.body, bytes)
        self._stage, self._path, self._notes, self._up = stage, path, notes, up
        self._headers, self._vary, self._fresh, self._now = headers, vary, fresh, now
        self._source: Body = up.body
        self._release = up.release
        self._kept: list[bytes] | None = []
        self._size = 0
        self._storing = False  # the entry is being written: that gives the slot back
        length = headers.get(hdrs.CONTENT_LENGTH, "")
        self._length = int(length) if length.isdigit() else None

    async def readany(self) -> bytes:
        try:
            chunk = await self._source.readany()
        except BaseException:  # the upstream broke off (or the request was cancelled)
            self._kept = None
            self._stage._finish(self._notes, False)
            raise
        kept = self._kept
        if chunk:
            if kept is not None:
                self._size += len(chunk)
                if self._size > self._stage.rule.max_object_bytes:
                    self._kept = None  # too big: stream on, hold nothing
                else:
                    kept.append(chunk)
                    if self._size == self._length:  # complete: store before the last bytes go
                        await self._store(kept)
            return chunk
        if kept is not None:
            await self._store(kept)
        return b""

    async def _store(self, kept: list[bytes]) -> None:
        self._kept = None
        self._storing = True
        await _finish_anyway(self._stage._store(
            self._path, self._notes, self._up, self._headers, b"".join(kept), self._vary,
            self._fresh, self._now,
        ))  # fmt: skip

    def release(self) -> None:
        """The relay is done with the body (whole, or the client left): the slot goes back."""
        self._kept = None
        if not self._storing:
            self._stage._finish(self._notes, False)
        if self._release is not None:
            self._release()


_WRITE: Final = object()  # exchange.cache_state of a write on a route with the stage


class InvalidateStage:
    """On a route that does not cache (when some route does): its successful writes still drop
    the entries of their path and parent collection, before the answer goes out."""

    def __init__(self, invalidator: Invalidator) -> None:
        self.invalidator = invalidator

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        if request.method in policy.UNSAFE_METHODS:
            exchange.cache_state = _WRITE
        return None

    async def on_response(self, exchange: Exchange, up: UpstreamResponse) -> UpstreamResponse:
        if exchange.cache_state is _WRITE and up.status < 400:
            await _finish_anyway(self.invalidator.paths(_dropped(exchange.path)))
        return up


def _dropped(path: str) -> list[str]:
    return list(policy.invalidated_paths(path))


def _fits(length: str, limit: int) -> bool:
    return length.isdigit() and int(length) <= limit
