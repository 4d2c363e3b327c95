"""Aggregate part paths with placeholders: `{rest}` and `{query.NAME}` (CONTRACT §11).

A path is split into literal text and placeholders once, when the config is loaded; a request
only joins the pieces. `{rest}` is the request path after the route's prefix, without its
leading slash, as the gateway normalized it (dot segments gone, escapes kept). A query value
is decoded and then percent-encoded with nothing left safe, so `a/b?c=d&e` becomes
`a%2Fb%3Fc%3Dd%26e`: it can never add a path segment, a query parameter or a fragment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

_PLACEHOLDER: Final = re.compile(r"\{([^{}]*)\}")
_QUERY_NAME: Final = re.compile(r"query\.([A-Za-z0-9_.~-]+)")


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """Literal pieces and placeholders, in order: ("/devices/", REST, "?room=", "room")."""

    pieces: tuple[tuple[str, str], ...]  # (kind, text): kind "text" | "rest" | "query"

    @property
    def static(self) -> bool:
        return all(kind == "text" for kind, _ in self.pieces)

    def render(self, rest: str, query: Mapping[str, str]) -> str:
        out = []
        for kind, text in self.pieces:
            if kind == "text":
                out.append(text)
            elif kind == "rest":
                out.append(rest)
            else:
                out.append(quote(query.get(text, ""), safe=""))
        return "".join(out)


def parse_template(path: str) -> PathTemplate | str:
    """The template, or why `path` is not one (for a FILE:LINE:COL error)."""
    pieces: list[tuple[str, str]] = []
    at = 0
    for match in _PLACEHOLDER.finditer(path):
        if match.start() > at:
            pieces.append(("text", path[at : match.start()]))
        name = match[1]
        query = _QUERY_NAME.fullmatch(name)
        if name == "rest":
            pieces.append(("rest", ""))
        elif query is not None:
            pieces.append(("query", query[1]))
        else:
            return f"unknown placeholder {{{name}}}: use {{rest}} or {{query.NAME}}"
        at = match.end()
    tail = path[at:]
    if "{" in tail or "}" in tail or any("{" in t or "}" in t for k, t in pieces if k == "text"):
        return "unbalanced '{' or '}': placeholders are {rest} and {query.NAME}"
    if tail:
        pieces.append(("text", tail))
    if any(c in path for c in " #\r\n\t"):
        return "must not hold spaces, control characters or '#'"
    return PathTemplate(tuple(pieces))
