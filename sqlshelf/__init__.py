"""A crash-safe `MutableMapping[bytes, bytes]` on one SQLite file, for `shelve.Shelf`.

`shelve` accepts any mapping, but this Python's only dbm is `dbm.dumb`, which rewrites its
index in place and can lose or corrupt data when the process dies mid-write. This mapping
uses the design CPython 3.13 adopted for `dbm.sqlite3`: one `Dict(key, value)` table, with
SQLite in WAL mode and `synchronous = FULL`, so a committed write survives `kill -9` (and
power loss), and an interrupted one rolls back on the next open.

Each assignment or deletion is its own transaction and is on disk when it returns;
`transaction()` groups several into one atomic commit. By default the connection takes an
exclusive lock for its whole life, so a second process can never open the same file and write
behind this one's back (the inventory). `shared=True` leaves the lock mode normal so several
processes use one file at once (the gateway's response cache, one connection per worker):
WAL lets readers run beside the one writer, a writer waits up to `lock_timeout` for another,
and `synchronous = NORMAL` keeps the file consistent through a crash while a commit skips the
fsync (the last commits before a power loss may be lost, which a cache can afford). The
connection belongs to the thread that created it: SQLite's `check_same_thread` stays on, so
use from any other thread fails loudly.

This is a top-level package of its own because both the inventory and the gateway use it, and
neither may import the other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

_PRAGMAS: Final = (
    "PRAGMA locking_mode = EXCLUSIVE",  # one process owns the file; must precede WAL
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",  # fsync the WAL on every commit: durable on return
)
_SHARED_PRAGMAS: Final = (
    "PRAGMA journal_mode = WAL",  # readers beside one writer, across processes
    "PRAGMA synchronous = NORMAL",  # consistent after a crash; commits skip the fsync
)
_CREATE: Final = "CREATE TABLE IF NOT EXISTS Dict (key BLOB UNIQUE NOT NULL, value BLOB NOT NULL)"
_GET: Final = "SELECT value FROM Dict WHERE key = ?"
_SET: Final = (
    "INSERT INTO Dict (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_DELETE: Final = "DELETE FROM Dict WHERE key = ?"
_KEYS: Final = "SELECT key FROM Dict"
_RANGE: Final = "SELECT key FROM Dict WHERE key >= ? AND key < ?"
_COUNT: Final = "SELECT COUNT(key) FROM Dict"
LOCK_TIMEOUT_SECONDS: Final = 2.0  # how long to wait for another holder to let go


class SqliteMapError(Exception):
    """The file cannot be opened as a store (locked by another process, not a database...)."""


class SqliteMapping(MutableMapping[bytes, bytes]):
    """bytes to bytes on one SQLite file; every write is durable when it returns."""

    def __init__(
        self, path: Path, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS, shared: bool = False
    ) -> None:
        self._pragmas = _SHARED_PRAGMAS if shared else _PRAGMAS
        try:
            self._cx: sqlite3.Connection | None = sqlite3.connect(
                path, timeout=lock_timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise SqliteMapError(f"cannot open {path}: {exc}") from exc
        try:
            self._configure()
        except sqlite3.Error as exc:
            self._cx.close()
            self._cx = None
            hint = " (is another process using it?)" if "locked" in str(exc) else ""
            raise SqliteMapError(f"cannot open {path}: {exc}{hint}") from exc

    def _configure(self) -> None:
        cx = self._connection
        for pragma in self._pragmas:
            cx.execute(pragma)
        mode = cx.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
        cx.execute(_CREATE)

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._cx is None:
            raise ValueError("the mapping is closed")
        return self._cx

    def __getitem__(self, key: bytes) -> bytes:
        row = self._connection.execute(_GET, (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        value: bytes = row[0]
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._connection.execute(_SET, (key, value))

    def __delitem__(self, key: bytes) -> None:
        if self._connection.execute(_DELETE, (key,)).rowcount == 0:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return self._connection.execute(_GET, (key,)).fetchone() is not None

    def __iter__(self) -> Iterator[bytes]:
        # Materialised, so writes while a caller iterates cannot disturb a live cursor.
        keys = [row[0] for row in self._connection.execute(_KEYS).fetchall()]
        return iter(keys)

    def keys_with_prefix(self, prefix: bytes) -> list[bytes]:
        """Every key that starts with `prefix` (non-empty), by one range scan of the key index."""
        if not prefix:
            raise ValueError("an empty prefix is every key: iterate instead")
        end = _successor(prefix)
        if end is None:  # all 0xff: nothing sorts after every such key but longer ones
            return [k for k in self if k.startswith(prefix)]
        return [row[0] for row in self._connection.execute(_RANGE, (prefix, end)).fetchall()]

    def __len__(self) -> int:
        count: int = self._connection.execute(_COUNT).fetchone()[0]
        return count

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside the block one atomic, durable commit (nests as one)."""
        cx = self._connection
        if cx.in_transaction:
            yield
            return
        cx.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            cx.execute("ROLLBACK")
            raise
        cx.execute("COMMIT")

    def pragma(self, name: str) -> object:
        """The current value of a read-only-safe PRAGMA (for checks and tests)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        row = self._connection.execute(f"PRAGMA {name}").fetchone()
        return None if row is None else row[0]

    def sync(self) -> None:
        """Nothing to do: every commit is already on disk. `shelve.Shelf.sync` calls this."""

    def close(self) -> None:
        """Close the connection; SQLite checkpoints the WAL into the main file and removes it."""
        if self._cx is not None:
            self._cx.close()
            self._cx = None


def _successor(prefix: bytes) -> bytes | None:
    """The smallest bytes value greater than every key that starts with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
