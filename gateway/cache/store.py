"""The response cache's storage: shelved-cache's `PersistentCache` over the shared SQLite file.

shelved-cache 0.5 gives an LRU (`cachetools`) mirrored to a `shelve` file. Its gaps, closed by
`_Shelved` below:
- it names shelf rows `str(hash(key))`, randomized per process: here the key already is a
  stable digest (`policy.digest`: the path, NUL, sha256 of the URL, key_by and Vary values);
- it opens `shelve.open`, which is `dbm.dumb` here (neither crash-safe nor multi-process): here
  the shelf is a `shelve.Shelf` over `sqlshelf.SqliteMapping(shared=True)`: WAL, one
  connection per worker, every worker reading and writing the one file;
- its `__delitem__` deletes the raw key from the file only: here it drops the entry from
  memory and file;
- it loads every row into memory at start (unbounded) and a TTL clock restarts on load: here
  nothing is loaded at start; a lookup that misses memory reads that one row, and expiry is
  wall-clock time inside the entry, so freshness and Age survive a restart.

Bounds: `max_entries` and `max_bytes` bound each worker's LRU (entries and body bytes). An
entry the LRU evicts is deleted from the file too (shelved-cache's delete callback), so the file
holds what the workers hold: at most workers x the bounds. On open, a file with more rows than
`max_entries` is trimmed to it (in key order, not by age: this only happens after the bounds
were lowered, or when several workers filled the file).

Workers share entries through the file and never serve a dropped one: every invalidation or
purge deletes the rows and bumps a generation row in the same transaction; every lookup reads
the generation first and, when it moved, forgets this worker's memory copies (they are read
again from the file on demand). A store whose generation moved since its lookup is not written
(a response fetched before a write must not be stored after it).

Hits do not wait for the thread: the generation is mirrored in an 8-byte file beside the
database (`GENERATION_NAME`), mmap'd shared by every worker and written inside the drop's
transaction, so the event loop reads it with a memory load. `CacheStore` keeps a bounded map of
hot entries (filled from thread lookups and successful puts, only under the generation the
mirror shows) and clears it whenever the mirror moves: a hit is then a dict probe on the loop,
and a write through any worker still makes the next lookup everywhere a miss.

All file work runs on one thread the store owns (like the inventory's store), never on the
event loop. A file that is not a database, or of another format, is logged, moved aside
(`NAME.corrupt-TIMESTAMP`) and replaced by an empty one, under an exclusive `flock` so two
workers starting together repair it once. Any SQLite failure later is logged and reads as a
miss: the cache never fails a request.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import pickle
import shelve
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, NamedTuple

from cachetools import LRUCache
from shelved_cache import PersistentCache

from gateway.cache.policy import Entry, VaryMarker, digest, vary_values
from gateway.config.model import CacheStoreConfig
from sqlshelf import SqliteMapError, SqliteMapping

logger = logging.getLogger("gateway.cache")

FILE_NAME: Final = "responses.sqlite3"
GENERATION_NAME: Final = "responses.generation"  # the generation, mirrored for the loop (mmap)
_GENERATION: Final = struct.Struct("<q")
HOT_ENTRIES: Final = 1024  # at most this many hot entries per worker (and max_entries, max_bytes)
THREAD_NAME: Final = "gateway-cache"
FORMAT: Final = 1  # the entry layout; a file holding another is moved aside
_FORMAT_KEY: Final = "\x01format"  # meta rows sort before every path ("/...")
_GENERATION_KEY: Final = "\x01generation"
_META: Final = frozenset({_FORMAT_KEY.encode(), _GENERATION_KEY.encode()})
LOCK_TIMEOUT_SECONDS: Final = 5.0  # a writer waits this long for another worker's commit
Stored = Entry | VaryMarker


def _size(value: Stored) -> int:
    return value.size if isinstance(value, Entry) else 64


def _resolve(
    get: Callable[[str], Stored | None],
    path: str,
    parts: tuple[str, ...],
    headers: Mapping[str, str],
) -> tuple[str, Entry | None, VaryMarker | None]:
    """(key, entry, the Vary marker it was found through) in the mapping behind `get`: the base
    key, then, when that holds a Vary marker, the variant's key."""
    key = digest(path, parts)
    value = get(key)
    marker = None
    if isinstance(value, VaryMarker):
        marker = value
        key = digest(path, (*parts, *vary_values(value.names, headers)))
        value = get(key)
        value = None if isinstance(value, VaryMarker) else value
    return key, value, marker


def _keys(
    path: str, parts: tuple[str, ...], vary: tuple[str, ...], headers: Mapping[str, str]
) -> tuple[str, str]:
    """(base key, entry key) of a response stored with these Vary names."""
    base = digest(path, parts)
    return base, digest(path, (*parts, *vary_values(vary, headers))) if vary else base


def _open_generation(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < _GENERATION.size:
            os.ftruncate(fd, _GENERATION.size)  # zeros: generation 0
        return mmap.mmap(fd, _GENERATION.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the file


class _BoundedLRU(LRUCache):  # type: ignore[misc]  # cachetools is not annotated
    """An LRU bounded by bytes (`maxsize`, through getsizeof) and by entry count."""

    def __init__(self, maxsize: int, max_entries: int, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize, getsizeof=_size)
        self.max_entries = max_entries
        self.on_evict = on_evict

    def __setitem__(self, key: str, value: Stored) -> None:
        while key not in self and len(self) >= self.max_entries:
            self.popitem()
        super().__setitem__(key, value)

    def popitem(self) -> tuple[str, Stored]:
        self.on_evict()
        item: tuple[str, Stored] = super().popitem()
        return item


class _Shelved(PersistentCache):  # type: ignore[misc]
    """shelved-cache with its 0.5 gaps closed (see the module docstring)."""

    wrapped: Any  # the library's LRU (a _BoundedLRU with its delete callback mixed in)
    persistent_dict: Any  # the shelf, None once closed

    def __init__(self, shelf: shelve.Shelf[Any], bounds: CacheStoreConfig, on_evict: Any) -> None:
        # A filename only so the library wires its delete callback; it never opens it.
        super().__init__(
            _BoundedLRU, "unused", bounds.max_bytes, bounds.max_entries, on_evict
        )  # fmt: skip
        self.persistent_dict = shelf  # set: initialize_if_not_initialized loads nothing
        self._bounds = bounds
        self._on_evict = on_evict

    @staticmethod
    def hash_key(key: str) -> str:
        return key  # already a stable digest (policy.digest)

    def forget(self) -> None:
        """Drop this worker's memory copies only; the file keeps its rows."""
        cls = type(self.wrapped)
        self.wrapped = cls(
            self.delete_callback, self._bounds.max_bytes, self._bounds.max_entries, self._on_evict
        )

    def lookup(self, key: str) -> Stored | None:
        try:
            value: Stored = self.wrapped[key]
            return value
        except KeyError:
            pass
        try:
            row = self.persistent_dict[key]
        except KeyError:
            return None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
            del self.persistent_dict[key]  # unreadable: drop it, read as a miss
            return None
        value = row[1]
        if not isinstance(value, Entry | VaryMarker):
            del self.persistent_dict[key]
            return None
        if _size(value) <= self._bounds.max_bytes:
            self.wrapped[key] = value  # memory only: the row is already in the file
        return value

    def __delitem__(self, key: str) -> None:
        if key in self.wrapped:
            del self.wrapped[key]  # the delete callback removes the row too
        else:
            self.persistent_dict.pop(key, None)


class Found(NamedTuple):  # a tuple: made on every lookup
    entry: Entry | None
    key: str  # the entry's key (the variant's when the response varies)
    generation: int  # the file's generation when looked up
    marker: VaryMarker | None = None  # the Vary marker the entry was found through


class CacheFile:
    """The synchronous half: the open file and this worker's LRU. Runs on the store thread."""

    def __init__(self, directory: Path, bounds: CacheStoreConfig) -> None:
        self.path = directory / FILE_NAME
        self.bounds = bounds
        self.evictions = 0
        directory.mkdir(parents=True, exist_ok=True)
        with _flock(directory / (FILE_NAME + ".lock")):
            self.db = self._open_or_replace()
            self.shelf: shelve.Shelf[Any] = shelve.Shelf(self.db, protocol=pickle.HIGHEST_PROTOCOL)
            if _FORMAT_KEY not in self.shelf:
                self.shelf[_FORMAT_KEY] = FORMAT
            self._trim()
            self.generation_map = _open_generation(directory / GENERATION_NAME)
            with self.db.transaction():  # drops write both under this lock: agree on the larger
                self.generation = max(self._generation(), self.mirrored())
                self.shelf[_GENERATION_KEY] = self.generation
                _GENERATION.pack_into(self.generation_map, 0, self.generation)
        self.cache = _Shelved(self.shelf, bounds, self._evicted)

    def _evicted(self) -> None:
        self.evictions += 1

    def _open_or_replace(self) -> SqliteMapping:
        try:
            db = SqliteMapping(self.path, lock_timeout=LOCK_TIMEOUT_SECONDS, shared=True)
            raw = db.get(_FORMAT_KEY.encode())  # not through a Shelf: its __del__ closes db
            found = FORMAT if raw is None else pickle.loads(raw)
            if found != FORMAT:
                db.close()
                raise SqliteMapError(f"format {found!r}, this gateway writes {FORMAT}")
            return db
        except (SqliteMapError, sqlite3.DatabaseError, pickle.UnpicklingError, EOFError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            logger.warning(
                "the cache file %s cannot be used (%s); moved aside to %s, starting empty",
                self.path, exc, aside.name,
            )  # fmt: skip
            for suffix in ("", "-wal", "-shm"):
                here = Path(f"{self.path}{suffix}")
                if here.exists():
                    os.replace(here, f"{aside}{suffix}")
            return SqliteMapping(self.path, lock_timeout=LOCK_TIMEOUT_SECONDS, shared=True)

    def _trim(self) -> None:
        """More rows than max_entries (left by more workers or larger bounds): trim, in key
        order (the LRU order of another run is not known)."""
        if len(self.db) - len(_META) <= self.bounds.max_entries:
            return  # a count of the key index: cheap; the scan below is rare
        rows = [k for k in self.db if k not in _META]  # keys only: no entry is read
        with self.db.transaction():
            for key in rows[: len(rows) - self.bounds.max_entries]:
                del self.db[key]

    def _generation(self) -> int:
        value = self.shelf.get(_GENERATION_KEY, 0)
        return value if isinstance(value, int) else 0

    def mirrored(self) -> int:
        """The generation as the mmap'd mirror shows it: a memory read, safe on the loop."""
        value: int = _GENERATION.unpack_from(self.generation_map)[0]
        return value

    def lookup(self, path: str, parts: tuple[str, ...], headers: Mapping[str, str]) -> Found:
        generation = self._generation()
        if generation != self.generation:  # another worker (or a replica) dropped entries
            self.generation = generation
            self.cache.forget()
        key, value, marker = _resolve(self.cache.lookup, path, parts, headers)
        if value is not None and not value.usable_stale(time.time()):
            del self.cache[key]  # past any use, stale_if_error included
            value = None
        return Found(value, key, generation, marker)

    def put(
        self,
        path: str,
        parts: tuple[str, ...],
        vary: tuple[str, ...],
        headers: Mapping[str, str],
        entry: Entry,
        generation: int,
    ) -> bool:
        """Store `entry` unless the file's generation moved since `generation` was read."""
        if entry.size > self.bounds.max_bytes:
            return False
        with self.db.transaction():
            if self._generation() != generation:
                return False  # invalidated while this response was on its way
            base, key = _keys(path, parts, vary, headers)
            if vary:
                self.cache[base] = VaryMarker(vary, entry.stale_until)
            self.cache[key] = entry
        return True

    def drop(self, prefixes: list[bytes]) -> int:
        """Delete every row whose key starts with one of `prefixes`; bump the generation."""
        with self.db.transaction():
            found = {k for p in prefixes for k in self.db.keys_with_prefix(p)}
            for key in found:
                del self.db[key]
            generation = max(self._generation(), self.mirrored()) + 1
            self.shelf[_GENERATION_KEY] = generation
            _GENERATION.pack_into(self.generation_map, 0, generation)  # before the commit
        return len(found)

    def stored_bytes(self) -> int:
        size: int = self.cache.wrapped.currsize
        return size

    def close(self) -> None:
        self.shelf.close()  # closes the connection, on this (its) thread
        self.cache.persistent_dict = None  # nothing left for the library's __del__ to close
        self.generation_map.close()


def path_prefixes(paths: list[str]) -> list[bytes]:
    """Row-key prefixes of exactly these paths (with or without a trailing slash)."""
    out = []
    for path in paths:
        bare = path.rstrip("/") or "/"
        out.append(f"{bare}\x00".encode(errors="surrogateescape"))
        if bare != "/":
            out.append(f"{bare}/\x00".encode(errors="surrogateescape"))
    return out


def subtree_prefixes(prefix: str) -> list[bytes]:
    """Row-key prefixes of `prefix` and every path under it, by segment: /a purges /a, /a/b,
    never /ab."""
    bare = prefix.rstrip("/")
    if not bare:
        return [b"/"]
    return [
        f"{bare}\x00".encode(errors="surrogateescape"),
        f"{bare}/".encode(errors="surrogateescape"),
    ]


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CacheStore:
    """The asynchronous face: each call is one job on the store's thread, except a lookup the
    hot map answers (see the module docstring). Opening is queued first at construction, so the
    store is usable at once; if the file cannot be opened at all (a directory that cannot be
    made), every lookup misses and nothing is stored."""

    def __init__(self, config: CacheStoreConfig) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        self._file: CacheFile | None = None
        self._opened = self._executor.submit(self._open)
        self._failing = False
        self.stored_bytes = 0  # this worker's LRU, after the last job (read by metrics)
        self.evictions = 0
        # Loop side only: hot entries valid under _hot_generation, oldest first.
        self._mirror: CacheFile | None = None  # set once open: its mmap'd generation is read
        self._hot: dict[str, Stored] = {}
        self._hot_bytes = 0
        self._hot_generation = -1
        self._hot_max = min(config.max_entries, HOT_ENTRIES)

    def _open(self) -> None:
        try:
            self._file = CacheFile(Path(self.config.directory), self.config)
            self._mirror = self._file
        except Exception as exc:  # never stops start-up: the routes serve, uncached
            logger.error(
                "the response cache is off: cannot open %s (%s)", self.config.directory, exc
            )

    async def _run(self, default: Any, job: Callable[[CacheFile], Any]) -> Any:
        def run() -> Any:
            file = self._file
            if file is None:
                return default
            try:
                result = job(file)
            except (sqlite3.Error, OSError, pickle.PickleError, UnicodeError) as exc:
                if not self._failing:
                    logger.warning("the cache file failed (%s); answering as a miss", exc)
                self._failing = True
                return default
            self._failing = False
            self.stored_bytes, self.evictions = file.stored_bytes(), file.evictions
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def _hot_now(self) -> int:
        """The mirrored generation (-1 before the file is open); the hot map is cleared when it
        is not the one the map was filled under."""
        mirror = self._mirror
        generation = -1 if mirror is None else mirror.mirrored()
        if generation != self._hot_generation:
            self._hot.clear()
            self._hot_bytes = 0
            self._hot_generation = generation
        return generation

    def _remember(self, generation: int, key: str, value: Stored) -> None:
        """Hot from now on, if read under the generation the mirror still shows."""
        size = _size(value)
        if generation < 0 or generation != self._hot_now() or size > self.config.max_bytes:
            return
        old = self._hot.pop(key, None)
        if old is not None:
            self._hot_bytes -= _size(old)
        self._hot[key] = value
        self._hot_bytes += size
        while len(self._hot) > self._hot_max or self._hot_bytes > self.config.max_bytes:
            self._hot_bytes -= _size(self._hot.pop(next(iter(self._hot))))

    def hot_count(self) -> int:
        return len(self._hot)

    def hot(self, path: str, parts: tuple[str, ...], headers: Mapping[str, str]) -> Found | None:
        """The entry if the hot map has it, found on the loop without a thread hop; None: ask
        `lookup`."""
        generation = self._hot_now()
        if self._hot:
            key, entry, marker = _resolve(self._hot.get, path, parts, headers)
            if entry is not None:
                if entry.usable_stale(time.time()):
                    return Found(entry, key, generation, marker)
                self._hot_bytes -= _size(self._hot.pop(key))  # the thread deletes it
        return None

    async def lookup(self, path: str, parts: tuple[str, ...], headers: Mapping[str, str]) -> Found:
        hot = self.hot(path, parts, headers)
        if hot is not None:
            return hot
        found: Found = await self._run(
            Found(None, "", -1), lambda f: f.lookup(path, parts, headers)
        )
        if found.entry is not None:
            if found.marker is not None:
                self._remember(found.generation, digest(path, parts), found.marker)
            self._remember(found.generation, found.key, found.entry)
        return found

    async def put(
        self,
        path: str,
        parts: tuple[str, ...],
        vary: tuple[str, ...],
        headers: Mapping[str, str],
        entry: Entry,
        generation: int,
    ) -> bool:
        if generation < 0:
            return False
        stored: bool = await self._run(
            False, lambda f: f.put(path, parts, vary, headers, entry, generation)
        )
        if stored:
            base, key = _keys(path, parts, vary, headers)
            if vary:
                self._remember(generation, base, VaryMarker(vary, entry.stale_until))
            self._remember(generation, key, entry)
        return stored

    async def drop_paths(self, paths: list[str]) -> int:
        dropped: int = await self._run(0, lambda f: f.drop(path_prefixes(paths)))
        return dropped

    async def purge(self, prefix: str) -> int:
        dropped: int = await self._run(0, lambda f: f.drop(subtree_prefixes(prefix)))
        return dropped

    async def stats(self) -> tuple[int, int]:
        """(body bytes this worker holds, evictions so far)."""
        stats: tuple[int, int] = await self._run((0, 0), lambda f: (f.stored_bytes(), f.evictions))
        return stats

    async def close(self) -> None:
        self._mirror = None  # the loop stops reading the mmap before the thread closes it
        self._hot_now()

        def close() -> None:
            if self._file is not None:
                self._file.close()
                self._file = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        await asyncio.to_thread(self._executor.shutdown, wait=True)
