"""Who the client is: X-Forwarded-For is believed only from `trusted_proxies`, walked right
to left (as uvicorn's proxy_headers does) until the first untrusted hop."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from ipaddress import ip_address
from typing import Final

from aiohttp import web
from multidict import istr

from gateway.config.model import Network

X_FORWARDED_FOR: Final = istr("X-Forwarded-For")


class ClientAddress:
    """Who the client is, believing X-Forwarded-For only from trusted proxies (right to left)."""

    def __init__(self, trusted: tuple[Network, ...]) -> None:
        self.trusted = trusted
        self.is_trusted: Callable[[str], bool] = lru_cache(maxsize=4096)(self._trusted)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def resolve(self, request: web.BaseRequest) -> tuple[str, str | None]:
        """(client address, the X-Forwarded-For value to extend: None when the peer is not a
        trusted proxy, "" when it is one that sent none, so its X-Forwarded-Proto and
        X-Forwarded-Host are still believed)."""
        peer = request.remote or ""
        if not self.trusted or not self.is_trusted(peer):
            return peer, None
        chain = ", ".join(request.headers.getall(X_FORWARDED_FOR, ()))
        client = peer
        for hop in reversed([h.strip() for h in chain.split(",") if h.strip()]):
            client = hop
            if not self.is_trusted(hop):
                break
        return client, chain
