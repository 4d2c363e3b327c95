"""API keys: `X-API-Key: <key>` or `Authorization: ApiKey <key>`, looked up by SHA-256.

The config holds only each key's hash (`python -m gateway hash-key` prints it), so neither the
file nor /config ever holds a key. A lookup is one hash and one dict probe: the hash is of a
random key, so comparing digests in a dict leaks nothing a timing attack could use.

A key that verified is remembered by its text (one dict probe instead of the hash on its next
requests). Only keys whose hash is configured are ever remembered, so the memo holds at most
one entry per configured key however many keys clients spray (those miss it and are hashed,
as before), and it goes with its config on reload. Its probe compares the presented text with
a remembered key only when their str hashes (seeded per process) are equal, which no client
can aim at: a wrong key costs the same whatever it has in common with a right one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDictProxy, istr

from gateway.auth.identity import CredentialRejected, Identity, RequestFacts, with_upstream_headers

X_API_KEY: Final = istr("X-API-Key")
MAX_KEY_BYTES: Final = 1024  # a longer key is refused unhashed


def hash_key(key: str) -> str:
    """The `key_sha256` of a key: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class ApiKeyAuthenticator:
    """Keys by hash -> the Identity each key stands for, built once per config."""

    __slots__ = ("_by_hash", "_verified")

    def __init__(self, keys: Iterable[tuple[str, str, frozenset[str]]]) -> None:
        """`keys`: (key_sha256, consumer, scopes) per configured key."""
        self._by_hash = {
            digest: with_upstream_headers(Identity(consumer, consumer, scopes, "api_key"))
            for digest, consumer, scopes in keys
        }
        self._verified: dict[str, Identity] = {}  # key text -> identity, for keys that verified

    def remembered(self) -> int:
        """Keys remembered as verified: never more than the keys configured."""
        return len(self._verified)

    async def authenticate(self, facts: RequestFacts) -> Identity | None:
        return self.identify(facts)

    def identify(self, facts: RequestFacts) -> Identity | None:
        """`authenticate` as a plain call: it never waits."""
        key = api_key(facts.headers)
        if key is None:
            return None
        identity = self._verified.get(key)
        if identity is None:
            identity = self._by_hash.get(hash_key(key))
            if identity is None:
                raise CredentialRejected("the API key is not known")
            if len(self._verified) < len(self._by_hash):  # one per configured key at most
                self._verified[key] = identity
        return identity


def api_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The key sent, or None when none was: X-API-Key first, then Authorization: ApiKey."""
    key = headers.get(X_API_KEY)
    if key is None:
        scheme, _, rest = headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "apikey":
            return None
        key = rest
    key = key.strip()
    if not key:
        raise CredentialRejected("the API key is empty")
    if len(key) > MAX_KEY_BYTES:
        raise CredentialRejected(f"the API key is longer than {MAX_KEY_BYTES} bytes")
    return key
