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
    """`relayed` for a header list (the upstream client's): the headers to relay, and whether
    the upstream sent a Server and a Content-Type. Most responses carry no hop-by-hop header
    at all, which one C-level test over the lowered names tells."""
    lowered = [name.lower() for name, _ in headers]
    if HOP_BY_HOP.isdisjoint(lowered):
        out = list(headers)
    else:
        out = []
        listed: set[str] = set()
        for pair, name in zip(headers, lowered, strict=True):
            if name in HOP_BY_HOP:
                if name == "connection":
                    listed.update(token.strip().lower() for token in pair[1].split(","))
                continue
            out.append(pair)
        if listed:
            out = [(name, value) for name, value in out if name.lower() not in listed]
    return out, "server" in lowered, "content-type" in lowered
