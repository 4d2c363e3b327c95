"""API keys: `X-API-Key: <key>` or `Authorization: ApiKey <key>`, looked up by SHA-256.

The config holds only each key's hash (`python -m gateway hash-key` prints it), so neither the
file nor /config ever holds a key. A lookup is one hash and one dict probe: the hash is of a
random key, so comparing digests in a dict leaks nothing a timing attack could use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDictProxy, istr

from gateway.auth.identity import CredentialRejected, Identity, RequestFacts

X_API_KEY: Final = istr("X-API-Key")
MAX_KEY_BYTES: Final = 1024  # a longer key is refused unhashed


def hash_key(key: str) -> str:
    """The `key_sha256` of a key: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class ApiKeyAuthenticator:
    """Keys by hash -> the Identity each key stands for, built once per config."""

    __slots__ = ("_by_hash",)

    def __init__(self, keys: Iterable[tuple[str, str, frozenset[str]]]) -> None:
        """`keys`: (key_sha256, consumer, scopes) per configured key."""
        self._by_hash = {
            digest: Identity(consumer, consumer, scopes, "api_key")
            for digest, consumer, scopes in keys
        }

    async def authenticate(self, facts: RequestFacts) -> Identity | None:
        key = api_key(facts.headers)
        if key is None:
            return None
        identity = self._by_hash.get(hash_key(key))
        if identity is None:
            raise CredentialRejected("the API key is not known")
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
