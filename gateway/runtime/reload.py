"""Hot reload: the config file is polled (every 0.5 s) and reloaded on SIGHUP. A new file is
loaded, validated and compiled off the event loop, then swapped in with one assignment; a bad
file leaves the old table serving and its errors in /config, the log and a metric.

Polling compares (mtime, size, inode), which also sees editors that save by renaming and
Kubernetes ConfigMap symlink swaps. A change is loaded once the file has stopped changing
for a moment, so a half-written file is not reported as an error. SIGHUP reloads at once,
whether or not the file looks changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from gateway.config.build import LoadResult, load
from gateway.config.read import file_hash

config_log = logging.getLogger("gateway.config")
POLL_INTERVAL: Final = 0.5  # seconds; an edit is live well within the promised 2 s
SETTLE: Final = 0.05  # seconds a changed file must keep still before it is read
MAX_SETTLE_ROUNDS: Final = 10  # a file rewritten non-stop is read after 0.5 s anyway

Signature = tuple[int, int, int] | None


def file_signature(path: Path) -> Signature:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _snapshot(path: Path) -> tuple[Signature, str | None]:
    """The file's signature and the hash of the very bytes it describes (a write landing in
    between is seen by the second stat, and the pair is taken again)."""
    for _ in range(MAX_SETTLE_ROUNDS):
        before = file_signature(path)
        try:
            data = path.read_bytes()
        except OSError:
            return before, None  # a missing file is the next poll's business
        if file_signature(path) == before:
            return before, file_hash(data)
    return None, None  # rewritten non-stop: the polls will catch up


class Reloader:
    """Watches one file; `trigger()` (SIGHUP) reloads at once."""

    def __init__(
        self,
        path: str,
        apply: Callable[[LoadResult], bool],
        interval: float = POLL_INTERVAL,
        served_hash: Callable[[], str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.apply = apply
        self.interval = interval
        self._wake = asyncio.Event()
        self._seen: Signature = None  # taken when run() starts, off the event loop
        self.served_hash = served_hash  # the version hash of the config being served

    def trigger(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._seen, digest = await asyncio.to_thread(_snapshot, self.path)
        if self.served_hash is not None and digest != self.served_hash():  # None: file gone
            # Edited between the first load and this watch: once it keeps still, load it.
            self._seen = await self._settled(self._seen)
            await self.reload(False)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
                forced = True
            except TimeoutError:
                forced = False
            self._wake.clear()
            signature = await self._stat()
            if signature != self._seen and not forced:
                signature = await self._settled(signature)
            if forced or signature != self._seen:
                self._seen = signature  # taken before reading: a later edit is seen again
                await self.reload(forced)

    async def _stat(self) -> Signature:
        return await asyncio.to_thread(file_signature, self.path)

    async def _settled(self, signature: Signature) -> Signature:
        """Wait until the file keeps the same signature for SETTLE seconds (bounded)."""
        for _ in range(MAX_SETTLE_ROUNDS):
            await asyncio.sleep(SETTLE)
            again = await self._stat()
            if again == signature:
                break
            signature = again
        return signature

    async def reload(self, forced: bool = True) -> bool:
        """Load, validate and compile the file off the loop, then apply it (or keep the old)."""
        config_log.info("reloading %s (%s)", self.path, "SIGHUP" if forced else "file changed")
        try:
            result = await asyncio.to_thread(load, os.fspath(self.path))
            return self.apply(result)
        except Exception:  # a bug, not a bad file: keep serving, keep watching, say so
            config_log.exception("reload of %s failed; the previous table keeps serving", self.path)
            return False
