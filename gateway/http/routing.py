"""Request paths to routes: dot-segment removal, then longest whole-segment prefix, then method.

Matching and forwarding both use the normalized path, so `..` (plain or percent-encoded) can
never reach a route other than the one the normalized path names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from gateway.config.model import RouteConfig
from gateway.http.errors import BadRequest, MethodNotAllowed, RouteNotFound
from gateway.http.pipeline import Chain
from gateway.http.proxies import ClientAddress

_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)


def split_target(raw: str) -> tuple[str, str]:
    """'/a/b?x=1' -> ('/a/b', '?x=1'); the query is kept byte for byte."""
    path, sep, query = raw.partition("?")
    return path, sep + query


def normalize_path(path: str) -> str:
    """RFC 3986 §6.2.2 normalization of a request path.

    Percent-encoded unreserved characters are decoded (so `%2e%2e` is `..`), other escapes are
    upper-cased and kept (`%2F` stays a byte of a segment, never a separator), empty segments
    are merged as nginx does, and dot segments are removed (§5.2.4).
    """
    if not path.startswith("/"):
        raise BadRequest("the request target must be an absolute path")
    if "%" not in path and "/." not in path and "//" not in path:
        return path  # the common case: nothing to normalize
    if "%" in path:
        path = _ESCAPE.sub(_unescape, path)
    out: list[str] = []
    segments = path.split("/")[1:]
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


def _unescape(match: re.Match[str]) -> str:
    byte = int(match[1], 16)
    return chr(byte) if byte in _UNRESERVED else "%" + match[1].upper()


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: its config and the chain its requests run through."""

    config: RouteConfig
    chain: Chain
    name: str = field(init=False)  # config.name, .service and .methods: read every request
    service: str = field(init=False)
    methods: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.config.name)
        object.__setattr__(self, "service", self.config.service)
        object.__setattr__(self, "methods", self.config.methods)

    @property
    def stages(self) -> tuple[str, ...]:
        """The names of its stages in order, then its action's."""
        return self.chain.names


class RouteTable:
    """The frozen table a request is matched against. Reload builds a new one and swaps it."""

    __slots__ = ("_depth", "_groups", "clients", "lanes", "routes")

    def __init__(self, routes: Iterable[Route], clients: ClientAddress | None = None) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self.clients = clients or ClientAddress(())  # trusted-proxy rules of this config
        # Whether the hit lane (servers/hitlane.py) may answer any request of this table: a
        # route with a lane, and no trusted proxy (the peer is the client).
        self.lanes = not self.clients.trusted and any(r.chain.lane for r in self.routes)
        groups: dict[str, list[Route]] = {}
        for route in self.routes:
            groups.setdefault(route.config.prefix, []).append(route)
        self._groups = {prefix: tuple(group) for prefix, group in groups.items()}
        self._depth = max((p.count("/") for p in self._groups if p != "/"), default=0)

    def match(self, method: str, path: str) -> Route:
        """The route for a normalized path, or RouteNotFound / MethodNotAllowed."""
        # probe: the path cut to the deepest prefix any route has, without a trailing "/"
        depth = self._depth
        if depth == 1:  # a table of one-segment prefixes (and "/")
            end = path.find("/", 1)
            probe = (path.rstrip("/") or "/") if end < 0 else path[:end]
        else:
            probe = path
            end = 0
            for _ in range(depth):
                end = path.find("/", end + 1)
                if end < 0:
                    probe = path.rstrip("/") or "/"
                    break
            else:
                probe = path[:end] or "/"
        groups = self._groups
        while True:
            group = groups.get(probe)
            if group is not None:
                for route in group:
                    if method in route.methods:
                        return route
                return self._refuse(method, group)
            if probe == "/":
                raise RouteNotFound("no route serves this path")
            probe = probe[: probe.rfind("/")] or "/"

    def _refuse(self, method: str, group: tuple[Route, ...]) -> Route:
        """No route of the prefix allows the method: a CORS route for a preflight, else 405."""
        if method == "OPTIONS":  # a CORS route answers preflights (stages/cors.py)
            for route in group:
                if route.config.cors is not None:
                    return route
        allow = ", ".join(sorted({m for r in group for m in r.config.methods}))
        error = MethodNotAllowed(
            f"{method} is not allowed here; allowed: {allow}", headers={"Allow": allow}
        )
        error.route = group[0].config.name
        raise error


def strip(prefix: str, path: str) -> str:
    """The path after the prefix rule: '/api/inventory/devices' -> '/devices'."""
    if prefix == "/":
        return path
    return path[len(prefix) :] or "/"
