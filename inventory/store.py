"""DeviceStore: devices in a `shelve.Shelf` over a crash-safe SQLite mapping, on one thread.

Layout of the shelf (keys are strings, values pickled by `shelve`):

    device:<id>    one device, a dict in the order id, name, type, room, state, created_at,
                   updated_at
    meta:next_id   the next id to assign; ids only grow and are never reused

Thread model: every touch of the file (SQLite calls, pickling, the in-memory index) happens
on one dedicated thread, a `ThreadPoolExecutor(max_workers=1)` the store owns. Coroutines
hand it one whole operation at a time, so operations run one after another: a read-check-
write such as an `If-Match` update is atomic without locks, two writers never interleave
inside a record, and the event loop never blocks on the disk.

Durability: each operation commits before its future resolves (see `sqlshelf`), so a
response is sent only for a write that is on disk. A create writes the device and the bumped
id counter in one transaction.

The index is the sorted list of ids plus each device's (type, room), rebuilt from the file
at open. It lets a list request filter and page without unpickling devices it skips.

Unservable records: the handlers refuse values JSON cannot carry, but a file written before
they did may hold some (an infinite number, a lone surrogate). Open finds them (the file is
locked from then on, so no new ones can appear), logs each, and from then on the store
hands out that record's `safe_form`: every read, list, ETag and precondition sees the same
servable device, and a PUT, PATCH or DELETE works on it like on any other.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import shelve
from bisect import bisect_left
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, ParamSpec, TypeAlias, TypeVar

from inventory.errors import DeviceNotFound, PreconditionFailed
from inventory.paging import select_page
from inventory.patch import etag_of, if_match_passes, if_none_match_allows_write, representation
from inventory.schema import JSON, safe_form
from sqlshelf import LOCK_TIMEOUT_SECONDS, SqliteMapError, SqliteMapping

logger = logging.getLogger(__name__)

Device: TypeAlias = dict[str, JSON]
Fields: TypeAlias = dict[str, JSON]
"""The client-owned members of a device: name, type, room, state."""
Edit: TypeAlias = Callable[[Fields], Fields]
"""Turns the current client-owned fields into validated new ones, or raises InvalidDevice."""
Clock: TypeAlias = Callable[[], datetime]

DEVICE_PREFIX: Final = "device:"
NEXT_ID_KEY: Final = "meta:next_id"
SERVER_FIELDS: Final = ("id", "created_at", "updated_at")
THREAD_NAME: Final = "inventory-store"
_MAX_ID_DIGITS: Final = 18
_TICK: Final = timedelta(microseconds=1)

P = ParamSpec("P")
T = TypeVar("T")


class StoreError(Exception):
    """The store cannot be opened; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class Filters:
    """Exact-match filters of a list request; None matches anything."""

    type: str | None = None
    room: str | None = None


@dataclass(frozen=True, slots=True)
class DevicePage:
    items: list[Device]
    next_after: int | None  # the key the next page starts after; None on the last page


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """`2025-01-31T18:04:05.123456Z`: UTC, microseconds, always the same width."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_id(device_id: str) -> int | None:
    """The numeric key of a device id, or None if no device can have that id."""
    if not device_id.isascii() or not device_id.isdecimal() or len(device_id) > _MAX_ID_DIGITS:
        return None
    if device_id.startswith("0"):
        return None
    return int(device_id)


def client_fields(device: Device) -> Fields:
    """The members a client may change: everything except the server's."""
    return {name: value for name, value in device.items() if name not in SERVER_FIELDS}


class _Shelf:
    """The synchronous half of the store. Every method runs on the store thread."""

    def __init__(self, path: Path, clock: Clock, lock_timeout: float) -> None:
        self._clock = clock
        self._db = SqliteMapping(path, lock_timeout=lock_timeout)
        self._shelf: shelve.Shelf[JSON] = shelve.Shelf(self._db, protocol=pickle.HIGHEST_PROTOCOL)
        self._next_id: int = self._shelf.get(NEXT_ID_KEY, 1)
        self._facets: dict[int, tuple[str, str]] = {}
        self._unservable: set[int] = set()  # keys whose records JSON cannot carry as stored
        for name in self._shelf:
            if name.startswith(DEVICE_PREFIX):
                key = int(name.removeprefix(DEVICE_PREFIX))
                device = self._shelf[name]
                if not _servable(device):
                    self._unservable.add(key)
                    device = safe_form(device)
                    logger.warning(
                        "device %d holds values JSON cannot carry; it is served in a safe form"
                        " (null, U+FFFD) until it is replaced or deleted",
                        key,
                    )
                self._facets[key] = _facets(device)
        self._keys: list[int] = sorted(self._facets)
        logger.info("opened %s: %d devices, next id %d", path, len(self._keys), self._next_id)

    def _load(self, key: int | None) -> Device:
        if key is None or key not in self._facets:
            raise DeviceNotFound("no device with this id")
        device: Device = self._shelf[f"{DEVICE_PREFIX}{key}"]
        if key in self._unservable:
            return dict(safe_form(device))
        return device

    def _stamp_after(self, previous: str | None) -> str:
        # Strictly later than the last write, even if the clock stalls or steps back, so every
        # write changes the representation and therefore the ETag (no A-B-A on If-Match).
        now = self._clock().astimezone(UTC)
        if previous is not None:
            floor = datetime.strptime(previous, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            now = max(now, floor + _TICK)
        return rfc3339(now)

    def get(self, device_id: str) -> Device:
        return self._load(parse_id(device_id))

    def create(self, fields: Fields) -> Device:
        key = self._next_id
        stamp = self._stamp_after(None)
        device = _compose(str(key), fields, stamp, stamp)
        with self._db.transaction():
            self._shelf[NEXT_ID_KEY] = key + 1
            self._shelf[f"{DEVICE_PREFIX}{key}"] = device
        self._next_id = key + 1
        self._facets[key] = _facets(device)
        self._keys.append(key)  # the largest key yet: the list stays sorted
        return device

    def update(
        self, device_id: str, edit: Edit, if_match: str | None, if_none_match: str | None
    ) -> Device:
        key = parse_id(device_id)
        current = self._load(key)
        _check_preconditions(current, if_match, if_none_match)
        fields = edit(client_fields(current))
        stamp = self._stamp_after(current["updated_at"])
        device = _compose(current["id"], fields, current["created_at"], stamp)
        self._shelf[f"{DEVICE_PREFIX}{key}"] = device
        self._facets[int(current["id"])] = _facets(device)
        self._unservable.discard(int(current["id"]))  # edits are validated: servable now
        return device

    def delete(self, device_id: str, if_match: str | None, if_none_match: str | None) -> None:
        key = parse_id(device_id)
        current = self._load(key)
        _check_preconditions(current, if_match, if_none_match)
        del self._shelf[f"{DEVICE_PREFIX}{key}"]
        del self._facets[int(current["id"])]
        del self._keys[bisect_left(self._keys, int(current["id"]))]
        self._unservable.discard(int(current["id"]))

    def page(self, filters: Filters, after: int | None, limit: int) -> DevicePage:
        def matches(key: int) -> bool:
            kind, room = self._facets[key]
            return filters.type in (None, kind) and filters.room in (None, room)

        chosen = select_page(self._keys, after, limit, matches)
        return DevicePage([self._load(key) for key in chosen.keys], chosen.next_after)

    def close(self) -> None:
        self._shelf.close()  # closes the mapping too


def _check_preconditions(current: Device, if_match: str | None, if_none_match: str | None) -> None:
    """RFC 9110 §13.2.2 order for a write to an existing device: If-Match, then If-None-Match."""
    if if_match is None and if_none_match is None:
        return
    etag = etag_of(current)
    if not if_match_passes(if_match, etag):
        raise PreconditionFailed("the device has changed since that ETag; fetch it again")
    if not if_none_match_allows_write(if_none_match, etag):
        raise PreconditionFailed("If-None-Match: the device exists and has a listed ETag")


def _servable(device: Device) -> bool:
    """Whether the stored record encodes as JSON as it is (see `safe_form` otherwise)."""
    try:
        representation(device)
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    return True


def _compose(device_id: str, fields: Fields, created_at: str, updated_at: str) -> Device:
    device: Device = {"id": device_id}
    device.update(fields)
    device["created_at"] = created_at
    device["updated_at"] = updated_at
    return device


def _facets(device: Device) -> tuple[str, str]:
    return (device["type"], device["room"])


class DeviceStore:
    """The asynchronous face of the store: each method runs one operation on its thread."""

    def __init__(self, executor: ThreadPoolExecutor, shelf: _Shelf) -> None:
        self._executor = executor
        self._shelf = shelf

    @classmethod
    async def open(
        cls, path: Path, *, clock: Clock = utc_now, lock_timeout: float = LOCK_TIMEOUT_SECONDS
    ) -> DeviceStore:
        """Open (or create) the store at `path`; raises StoreError if it cannot.

        `lock_timeout` is how long to wait for another process to release the file.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        loop = asyncio.get_running_loop()
        try:
            shelf = await loop.run_in_executor(executor, _Shelf, path, clock, lock_timeout)
        except SqliteMapError as exc:
            executor.shutdown(wait=False)
            raise StoreError(str(exc)) from exc
        return cls(executor, shelf)

    async def _run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args, **kwargs))

    async def get(self, device_id: str) -> Device:
        """The device, or DeviceNotFound."""
        return await self._run(self._shelf.get, device_id)

    async def create(self, fields: Fields) -> Device:
        """Store a new device from validated client fields; returns it with its id."""
        return await self._run(self._shelf.create, fields)

    async def update(
        self,
        device_id: str,
        edit: Edit,
        *,
        if_match: str | None,
        if_none_match: str | None = None,
    ) -> Device:
        """Replace a device's client fields with `edit(current fields)`, atomically.

        Checks, in this order: the device exists (DeviceNotFound), `if_match` holds and
        `if_none_match` does not match its current ETag (PreconditionFailed), `edit` accepts
        it (whatever `edit` raises).
        """
        return await self._run(self._shelf.update, device_id, edit, if_match, if_none_match)

    async def delete(
        self, device_id: str, *, if_match: str | None, if_none_match: str | None = None
    ) -> None:
        """Delete a device: DeviceNotFound, PreconditionFailed, or done."""
        await self._run(self._shelf.delete, device_id, if_match, if_none_match)

    async def page(self, filters: Filters, after: int | None, limit: int) -> DevicePage:
        """Up to `limit` devices matching `filters` whose keys come after `after`."""
        return await self._run(self._shelf.page, filters, after, limit)

    async def close(self) -> None:
        """Close the file on the store thread, then let the thread go."""
        await self._run(self._shelf.close)
        await asyncio.to_thread(self._executor.shutdown, wait=True)
