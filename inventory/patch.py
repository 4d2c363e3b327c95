"""JSON merge patch (RFC 7396) and entity tags (RFC 9110 §8.8.3, §13.1): pure functions.

A device's representation is the exact JSON bytes the service sends, and its entity tag is
a digest of those bytes. That makes the tag *strong* (RFC 9110 §8.8.1): two responses share
a tag only if their bodies are byte-for-byte identical. Every write also moves
`updated_at`, so a write always changes the tag, and `If-Match` detects it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Final

from inventory.schema import JSON

ETAG_DIGEST_CHARS: Final = 32  # 128 bits of sha256, hex-encoded

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, listed with commas (RFC 9110 §8.8.3, §5.6.1).
_LIST_ITEM: Final = re.compile(r'[ \t]*(?:(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*)?(?:,|$)')


def merge_patch(target: JSON, patch: JSON) -> JSON:
    """Apply `patch` to `target` as RFC 7396 §2 describes.

    Neither argument is modified; the result may share unchanged parts with them.
    A patch that is not an object replaces the target; `null` members delete.
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def representation(document: JSON) -> bytes:
    """The exact bytes served for `document`: compact UTF-8 JSON, members in stored order."""
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def strong_etag(body: bytes) -> str:
    """A strong entity tag for a response body: a quoted digest of its bytes."""
    return '"' + hashlib.sha256(body).hexdigest()[:ETAG_DIGEST_CHARS] + '"'


def etag_of(document: JSON) -> str:
    """The entity tag a response carrying `document` gets."""
    return strong_etag(representation(document))


def parse_etags(header: str) -> tuple[list[tuple[bool, str]], bool] | None:
    """Split an `If-Match`/`If-None-Match` value into (weak, tag) pairs and a `*` flag.

    Returns None when the value is not a valid list of entity tags.
    """
    if header.strip() == "*":
        return [], True
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(header):
        match = _LIST_ITEM.match(header, position)
        if match is None or match.end() == position:
            return None
        if match.group(2) is not None:
            tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return (tags, False) if tags else None


def if_match_passes(header: str | None, current: str) -> bool:
    """RFC 9110 §13.1.1: true when the request may proceed on a resource tagged `current`.

    Comparison is strong: a weak tag never matches. An unparsable header fails, so a
    client can never write by accident on a garbled precondition.
    """
    if header is None:
        return True
    parsed = parse_etags(header)
    if parsed is None:
        return False
    tags, any_tag = parsed
    return any_tag or any(not weak and tag == current for weak, tag in tags)


def if_none_match_passes(header: str | None, current: str) -> bool:
    """RFC 9110 §13.1.2: false when the client already holds `current` (answer 304).

    Comparison is weak: `W/"x"` and `"x"` match.
    """
    return _none_match(header, current, garbled=True)


def if_none_match_allows_write(header: str | None, current: str) -> bool:
    """RFC 9110 §13.1.2 on a write to an existing resource tagged `current`.

    False (answer 412, write nothing) when the header is `*`, which any existing resource
    matches, or lists `current` (weak comparison). An unparsable header fails too, as for
    `If-Match`: a garbled precondition never lets a write through.
    """
    return _none_match(header, current, garbled=False)


def _none_match(header: str | None, current: str, *, garbled: bool) -> bool:
    """If-None-Match holds (no listed tag is `current`, no `*`); `garbled` when unparsable."""
    if header is None:
        return True
    parsed = parse_etags(header)
    if parsed is None:
        return garbled
    tags, any_tag = parsed
    return not (any_tag or any(tag == current for _weak, tag in tags))
