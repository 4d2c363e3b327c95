"""JWKS key sets, fetched with aiohttp (PyJWT's PyJWKClient blocks on urllib: never on the
loop). The set is fetched on the first token, refreshed in the background every `refresh`
seconds, and re-fetched at once when a token names an unknown `kid`, at most once per
`MIN_REFETCH` seconds per URL, whatever tokens arrive. A failed fetch keeps the last good set;
a key removed from the set stops verifying after the next successful fetch. Which of a
key's algorithms a token may use is the authenticator's pinned list, checked there.

Only signing keys of the asymmetric types the algorithms use are kept: an `oct` (HMAC) key
in a public key set is skipped, so a JWKS never turns a public key into a shared secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp
import jwt
from yarl import URL

from gateway.auth.jwt import VerifyKey
from gateway.config.jwtkeys import ALGORITHM_KEYS, PublicKey, key_kind

logger = logging.getLogger("gateway.upstream")

MIN_REFETCH: Final = 30.0  # seconds between fetches of one URL for unknown kids
DEFAULT_REFRESH: Final = 300.0  # seconds between background refreshes
FETCH_TIMEOUT: Final = 5.0  # seconds for one fetch
MAX_JWKS_BYTES: Final = 1 << 20  # a larger key set is a failed fetch
MAX_KID_CHARS: Final = 256  # a longer kid is an unknown kid, without a lookup


class JwksKeys:
    """One JWKS URL's current keys; a `KeySource` for JwtAuthenticator."""

    def __init__(
        self,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        refresh: float = DEFAULT_REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.refresh = url, refresh
        self.generation = 0
        self._session, self._clock = session, clock
        self._keys: dict[str, VerifyKey] | None = None  # None: never fetched successfully
        self._fetched = self._tried = -1e18  # clock values of the last success and attempt
        self._inflight: asyncio.Task[None] | None = None
        self._shown = str(URL(url).with_user(None).with_query(None))  # for logs

    async def find(self, kid: str | None) -> VerifyKey | None:
        now = self._clock()
        if self._keys is None:
            if now - self._tried >= MIN_REFETCH:
                await self.fetch()
        elif now - self._fetched >= self.refresh and self._inflight is None:
            self._start_fetch()  # in the background: this token uses the set as it is
        found = self._lookup(kid)
        if found is None and self._keys is not None and now - self._tried >= MIN_REFETCH:
            await self.fetch()  # an unknown kid: the issuer may have rotated its key
            found = self._lookup(kid)
        return found

    def _lookup(self, kid: str | None) -> VerifyKey | None:
        keys = self._keys
        if not keys:
            return None
        if kid is None:  # no kid: only a set of one key names it unambiguously
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid) if len(kid) <= MAX_KID_CHARS else None

    async def fetch(self) -> None:
        """Fetch the set now, or wait for the fetch already under way."""
        if self._inflight is None:
            self._start_fetch()
        assert self._inflight is not None
        await asyncio.shield(self._inflight)  # a cancelled request does not cancel the fetch

    def _start_fetch(self) -> None:
        self._tried = self._clock()
        self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name="jwks fetch")

    async def _fetch(self) -> None:
        try:
            keys = parse_jwks(await self._download())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            kept = "keeping the last good set" if self._keys is not None else "no keys yet"
            logger.warning("JWKS %s fetch failed (%s); %s", self._shown, _describe(exc), kept)
            return
        finally:
            self._inflight = None
        self._fetched = self._clock()
        if keys != self._keys:
            self._keys = keys
            self.generation += 1

    async def _download(self) -> Any:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with self._session().get(self.url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise BadKeySet(f"status {resp.status}")
            if (resp.content_length or 0) > MAX_JWKS_BYTES:
                raise BadKeySet("too large")
            body = await resp.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise BadKeySet("too large")
            return json.loads(body)

    async def close(self) -> None:
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class BadKeySet(ValueError):
    """The URL answered, but not with a usable key set (the message says how, for the log)."""


def parse_jwks(data: Any) -> dict[str, VerifyKey]:
    """kid -> key for each usable signing key; BadKeySet when none is usable."""
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BadKeySet("not a JWK set")
    keys: dict[str, VerifyKey] = {}
    for entry in entries:
        parsed = _verify_key(entry)
        if parsed is not None:
            keys[entry.get("kid", "")] = parsed
    if not keys:
        raise BadKeySet("no usable signing key")
    return keys


def _verify_key(entry: Any) -> VerifyKey | None:
    if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
        return None  # oct (a shared secret) never comes from a public set
    if entry.get("use", "sig") != "sig" or not isinstance(entry.get("kid", ""), str):
        return None
    try:
        key = jwt.PyJWK(entry).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(key, PublicKey):
        return None  # a private key published by mistake: not used
    kind = key_kind(key)
    fits = [a for a, needs in ALGORITHM_KEYS.items() if needs == kind]
    alg = entry.get("alg")
    if alg is not None:  # the JWK names its one algorithm (RFC 7517 §4.4)
        fits = [a for a in fits if a == alg]
    return VerifyKey(key, tuple(fits)) if fits else None


def _describe(exc: Exception) -> str:
    match exc:
        case TimeoutError():
            return "timeout"
        case aiohttp.ClientError():
            return type(exc).__name__
        case BadKeySet():
            return str(exc)
    return "not UTF-8 JSON"


class JwksStore:
    """The JWKS sets of a process, one per URL, kept across reloads (so the 30 s rule holds
    per URL), and the one ClientSession they are fetched with (opened on first use)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._sets: dict[str, JwksKeys] = {}
        self._client: aiohttp.ClientSession | None = None
        self._clock = clock

    def keys(self, url: str, refresh: float = DEFAULT_REFRESH) -> JwksKeys:
        found = self._sets.get(url)
        if found is None:
            found = self._sets[url] = JwksKeys(url, self.session, refresh, self._clock)
        found.refresh = refresh  # the latest config's
        return found

    def session(self) -> aiohttp.ClientSession:
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(auto_decompress=True)
        return self._client

    async def close(self) -> None:
        for keys in self._sets.values():
            await keys.close()
        if self._client is not None:
            await self._client.close()
