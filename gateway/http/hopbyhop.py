"""Which headers belong to one connection (RFC 9110 §7.6.1) or to the gateway, and so are
never passed along as they came; the one filter for headers relayed back to a client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDictProxy

# RFC 9110 §7.6.1 (and Proxy-Connection, a non-standard relative): never forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway, never taken from the client as sent.
GATEWAY_OWNED: Final = frozenset(
    {
        "host",
        "expect",
        "x-request-id",
        "traceparent",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
        "forwarded",
        "x-consumer",
        "x-auth-subject",
        "x-auth-scopes",
    }
)
REQUEST_DROP: Final = HOP_BY_HOP | GATEWAY_OWNED


def connection_listed(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> frozenset[str]:
    """`drop` plus the names a Connection header lists (RFC 9110 §7.6.1)."""
    listed = headers.getall(hdrs.CONNECTION, ())
    if not listed:
        return drop
    return drop | {name.strip().lower() for value in listed for name in value.split(",")}


def relayed(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """An upstream response's headers minus hop-by-hop ones (RFC 9110 §7.6.1)."""
    drop = connection_listed(headers, HOP_BY_HOP)
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


def relayed_pairs(
    headers: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], bool, bool]:
    """`relayed` for a header list (the upstream client's), in one pass: the headers to relay,
    and whether the upstream sent a Server and a Content-Type."""
    out: list[tuple[str, str]] = []
    listed: set[str] | None = None
    server = content_type = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            if lowered == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                listed = tokens if listed is None else listed | tokens
            continue
        if lowered == "server":
            server = True
        elif lowered == "content-type":
            content_type = True
        out.append((name, value))
    if listed:
        out = [(name, value) for name, value in out if name.lower() not in listed]
    return out, server, content_type
