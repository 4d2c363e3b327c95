"""Cursor paging over the creation order: limits, opaque cursors, and page selection.

Devices are listed in ascending id order. Ids come from a counter that only grows and is
never reused, so the order is fixed at creation: a device added while a client pages through
the list lands after everything it has seen, and a deleted one simply stops appearing.
A cursor encodes the last id a page returned; the next page starts strictly after it. A
client that pages to the end therefore sees every device that existed throughout exactly
once, in order, whatever happens between its requests.

Cursors are opaque to clients: url-safe base64 of a versioned string (`v1:<id>`), so the
format can change without clients depending on it.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from inventory.errors import InvalidQuery

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
CURSOR_VERSION: Final = "v1"
MAX_CURSOR_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class PageKeys:
    """The keys one page shows, and where the next page starts (None: this is the last)."""

    keys: list[int]
    next_after: int | None


def parse_limit(raw: str | None) -> int:
    """The `limit` query parameter: 1 to MAX_LIMIT, DEFAULT_LIMIT when absent."""
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdecimal() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw[:20]!r}")
    return int(raw)


def encode_cursor(after: int) -> str:
    """An opaque cursor meaning "the page that starts after key `after`"."""
    raw = f"{CURSOR_VERSION}:{after}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The key a cursor points after; None (start at the beginning) when absent."""
    if cursor is None:
        return None
    bad = InvalidQuery("cursor is not one this service issued; start again without it")
    if len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise bad from exc
    version, _, after = text.partition(":")
    if version != CURSOR_VERSION or not after.isdecimal() or not after.isascii():
        raise bad
    return int(after)


def select_page(
    keys: Sequence[int], after: int | None, limit: int, matches: Callable[[int], bool]
) -> PageKeys:
    """Pick up to `limit` matching keys that come after `after` in sorted `keys`.

    It looks one match past the page, so `next_after` is set only when another page has
    something in it, and the last page says so instead of leaving an empty page to fetch.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    start = 0 if after is None else bisect_right(keys, after)
    chosen: list[int] = []
    for index in range(start, len(keys)):
        key = keys[index]
        if not matches(key):
            continue
        if len(chosen) == limit:
            return PageKeys(chosen, chosen[-1])
        chosen.append(key)
    return PageKeys(chosen, None)
