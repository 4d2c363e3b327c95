"""The RFC 9111 subset the response cache obeys (CONTRACT §10), as pure functions.

Nothing here does I/O or keeps state: the stage asks, these answer from headers and clocks.
- What may be looked up: GET and HEAD, without `Cache-Control: no-store` from the client, and
  never a request carrying `Authorization` or `Cookie` unless the route keys by consumer and
  one is known (then the entry is that consumer's alone).
- What may be stored: statuses 200, 203, 204, 300, 301, 404, 410, without `no-store`,
  `private`, `no-cache`, `Set-Cookie` or `Vary: *`. (`no-cache` means "revalidate before every
  use"; without conditional requests upstream such an entry would save nothing, so it is not
  stored.)
- Freshness: `s-maxage`, else `max-age`, else `Expires - Date`, else the route's `ttl`; never
  more than `ttl`. Age per §4.2.3: the larger of the `Age` the upstream sent and `now - Date`,
  plus the time since the response arrived.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Final, NamedTuple

from aiohttp import hdrs  # header names as istr: found without folding them first

from gateway.config.model import CachePolicy

CACHEABLE_METHODS: Final = frozenset({"GET", "HEAD"})
CACHEABLE_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 404, 410})
UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNSTORABLE_DIRECTIVES: Final = frozenset({"no-store", "private", "no-cache"})
# Not kept in an entry: per-connection, per-answer or recomputed on every hit.
NOT_STORED: Final = frozenset({"age", "x-cache", "date", "set-cookie", "content-length"})
# Sent with a 304 (RFC 9110 §15.4.5) when they are in the entry.
NOT_MODIFIED_KEEP: Final = frozenset(
    {"cache-control", "content-location", "etag", "expires", "last-modified", "vary"}
)
DIGESTS_KEPT: Final = 4096  # storage keys remembered (digest): about a worker's hot entries x 4


def directives(values: Iterable[str]) -> dict[str, str]:
    """`Cache-Control` fields to {directive: argument}; names lower-cased, quotes dropped."""
    out: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name, _, arg = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = arg.strip().strip('"')
    return out


def _seconds(arg: str | None) -> int | None:
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


def http_date(value: str | None) -> float | None:
    """An HTTP-date as POSIX seconds; None when absent or unparseable (then: already past)."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class RequestView(NamedTuple):  # a tuple: made on every request of a cached route
    """What the cache needs of a request, taken once per request."""

    method: str
    no_store: bool  # Cache-Control: no-store: neither answered from nor stored
    revalidate: bool  # no-cache, max-age=0 or Pragma: no-cache: go upstream, refresh the entry
    credentials: bool  # Authorization or Cookie present


def view_request(method: str, headers: Mapping[str, str]) -> RequestView:
    cc = headers.get(hdrs.CACHE_CONTROL)
    credentials = hdrs.AUTHORIZATION in headers or hdrs.COOKIE in headers
    if not cc:
        pragma = headers.get(hdrs.PRAGMA)
        if pragma is None and not credentials:
            return _PLAIN.get(method) or RequestView(method, False, False, False)
        revalidate = pragma is not None and "no-cache" in pragma.lower()
        return RequestView(method, False, revalidate, credentials)
    found = directives((cc,))
    revalidate = "no-cache" in found or found.get("max-age") == "0"
    return RequestView(method, "no-store" in found, revalidate, credentials)


# The view of most requests (no Cache-Control, Pragma or credentials), made once.
_PLAIN: Final = {m: RequestView(m, False, False, False) for m in CACHEABLE_METHODS}


def bypass_reason(req: RequestView, rule: CachePolicy, consumer: str) -> str | None:
    """Why this request may neither be answered from nor stored in the cache; None: it may."""
    if req.method not in CACHEABLE_METHODS:
        return "method"
    if req.no_store:
        return "no-store"
    if req.credentials and not (consumer and "consumer" in rule.key_by):
        return "credentials"  # an entry shared between clients must never hold this answer
    return None


def base_key(
    path_qs: str, rule: CachePolicy, consumer: str, headers: Mapping[str, str]
) -> tuple[str, ...]:
    """What identifies an entry before Vary: the URL and the route's key_by values."""
    parts = [path_qs]
    for item in rule.key_by:
        if item == "consumer":
            parts.append(f"consumer={consumer}")
        else:
            name = item[len("header:") :]
            parts.append(f"{name.lower()}={headers.get(name, '')}")
    return tuple(parts)


@functools.lru_cache(maxsize=DIGESTS_KEPT)
def digest(path: str, parts: tuple[str, ...]) -> str:
    """The stable storage key: the path (so a path or a prefix can be dropped by a range scan of
    the file's key index), NUL, then sha256 of every part. Never Python's per-process hash().
    Remembered for the last DIGESTS_KEPT keys: a hit looks its key up by it, and a hash of the
    tuple costs a fraction of a sha256."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    return f"{path}\x00{h.hexdigest()}"


def vary_names(values: Iterable[str]) -> tuple[str, ...] | None:
    """The header names a response varies on, sorted and lower-cased; None for `Vary: *`."""
    names: set[str] = set()
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def vary_values(names: tuple[str, ...], headers: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(f"{name}={headers.get(name, '')}" for name in names)


@dataclass(frozen=True, slots=True)
class Freshness:
    lifetime: float  # seconds the response is fresh from its generation, at most ttl
    initial_age: float  # its age when it arrived (RFC 9111 §4.2.3 corrected_initial_age)


def storable(status: int, headers: Mapping[str, str], get_all: Iterable[str]) -> str | None:
    """Why a response must not be stored; None: it may be. `get_all` is its Cache-Control."""
    if status not in CACHEABLE_STATUSES:
        return "status"
    found = directives(get_all)
    if UNSTORABLE_DIRECTIVES & found.keys():
        return "cache-control"
    if "Set-Cookie" in headers:
        return "set-cookie"
    return None


def freshness(
    headers: Mapping[str, str], cache_control: Iterable[str], rule: CachePolicy, now: float
) -> Freshness:
    """How long a storable response stays fresh, and how old it already is."""
    found = directives(cache_control)
    date = http_date(headers.get("Date"))
    lifetime: float | None = _seconds(found.get("s-maxage"))
    if lifetime is None:
        lifetime = _seconds(found.get("max-age"))
    if lifetime is None and "Expires" in headers:
        expires = http_date(headers.get("Expires"))
        lifetime = 0.0 if expires is None else max(0.0, expires - (date or now))
    if lifetime is None:
        lifetime = rule.ttl
    age = _seconds(headers.get("Age")) or 0
    apparent = 0.0 if date is None else max(0.0, now - date)
    return Freshness(min(float(lifetime), rule.ttl), max(apparent, float(age)))


@dataclass(slots=True, weakref_slot=True)  # weakref: cache/wire.py keeps encoded heads
class Entry:
    """One stored response. Wall-clock times (POSIX seconds), so freshness and Age survive a
    restart; pickled into the shared file."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # as relayed, minus NOT_STORED
    body: bytes
    stored_at: float  # when the response arrived
    initial_age: float  # its age then
    fresh_until: float  # stored_at + lifetime - initial_age
    stale_until: float  # fresh_until + the route's stale_if_error
    etag: str | None = None
    last_modified: float | None = None
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.body) + sum(len(n) + len(v) for n, v in self.headers) + 64

    def age(self, now: float) -> int:
        return int(self.initial_age + max(0.0, now - self.stored_at))

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def usable_stale(self, now: float) -> bool:
        return now < self.stale_until


@dataclass(frozen=True, slots=True)
class VaryMarker:
    """Stored under the base key when the response varies: the names the variants are keyed by."""

    names: tuple[str, ...]
    stale_until: float  # as long as its longest-lived variant may be used


def make_entry(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    lookup: Mapping[str, str],
    body: bytes,
    fresh: Freshness,
    rule: CachePolicy,
    now: float,
) -> Entry:
    kept = tuple((n, v) for n, v in headers if n.lower() not in NOT_STORED)
    fresh_until = now + fresh.lifetime - fresh.initial_age
    return Entry(
        status=status,
        reason=reason,
        headers=kept,
        body=body,
        stored_at=now,
        initial_age=fresh.initial_age,
        fresh_until=fresh_until,
        stale_until=fresh_until + rule.stale_if_error,
        etag=lookup.get("ETag"),
        last_modified=http_date(lookup.get("Last-Modified")),
    )


def _weak(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def not_modified(entry: Entry, headers: Mapping[str, str]) -> bool:
    """Whether a conditional request is answered 304 from this fresh entry (RFC 9110 §13.2.2:
    If-None-Match, weakly compared, wins over If-Modified-Since)."""
    inm = headers.get(hdrs.IF_NONE_MATCH)
    if inm is not None:
        if entry.etag is None:
            return inm.strip() == "*"
        mine = _weak(entry.etag)
        return any(t.strip() == "*" or _weak(t.strip()) == mine for t in inm.split(","))
    since = headers.get(hdrs.IF_MODIFIED_SINCE)
    ims = None if since is None else http_date(since)
    if ims is None:
        return False
    modified = entry.last_modified if entry.last_modified is not None else entry.stored_at
    return modified <= ims


def invalidated_paths(path: str) -> tuple[str, ...]:
    """A write to `path` drops it and its parent collection: /devices/7 -> /devices."""
    trimmed = path.rstrip("/") or "/"
    parent = trimmed.rpartition("/")[0] or "/"
    return (trimmed,) if parent == trimmed else (trimmed, parent)
