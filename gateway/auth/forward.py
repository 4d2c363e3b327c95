"""`auth.forward`: ask an external auth service whether a request may pass (CONTRACT §8).

The gateway sends `GET service + path` with the request's credential headers (Authorization,
Cookie, X-API-Key; never the body) and its method and path as X-Forwarded-Method and
X-Forwarded-Uri (Traefik's forwardAuth names, which Authelia and oauth2-proxy read). The
call goes through `Service.send`, so the auth service's pools, breakers, retries and
timeouts apply; the sub-request is its own upstream call record (kind "auth").

  2xx          admitted: X-Consumer (else ""), X-Auth-Subject (else the consumer) and
               X-Auth-Scopes (space-separated) of the answer make the Identity; the headers
               named in copy_headers go upstream (Identity.headers)
  401 / 403    relayed as problem+json, with the service's WWW-Authenticate
  other        503, as is an error or no answer within the service's timeouts: never admitted

With `cache`, a decision (an admit, a 401 or a 403; never a 503) is reused for that long per
credential, in a bounded LRU keyed by a SHA-256 of the credential headers, so a secret is
never a key and never logged. The cache keys on the credentials only, as the contract says:
it suits services that decide who the caller is, not ones that decide per path.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.auth.identity import Identity, RequestFacts
from gateway.config.model import ForwardAuthConfig
from gateway.http.errors import (
    AuthUnavailable,
    Forbidden,
    GatewayError,
    Unauthenticated,
    UpstreamError,
)
from gateway.upstream.breaker import Clock
from gateway.upstream.service import Headers, Service

X_API_KEY: Final = istr("X-API-Key")
CREDENTIAL_HEADERS: Final = (hdrs.AUTHORIZATION, hdrs.COOKIE, X_API_KEY)
X_FORWARDED_METHOD: Final = istr("X-Forwarded-Method")
X_FORWARDED_URI: Final = istr("X-Forwarded-Uri")
X_FORWARDED_HOST: Final = istr("X-Forwarded-Host")
X_CONSUMER: Final = istr("X-Consumer")
X_AUTH_SUBJECT: Final = istr("X-Auth-Subject")
X_AUTH_SCOPES: Final = istr("X-Auth-Scopes")
CACHE_ENTRIES: Final = 10_000  # decisions kept at most; the least recently used go first

Decision = Identity | tuple[int, str | None]  # an admit, or (401 | 403, WWW-Authenticate)


class ForwardAuth:
    """The `forward` authenticator (gateway.auth.identity.Authenticator)."""

    def __init__(
        self,
        config: ForwardAuthConfig,
        service: Service,
        clock: Clock = time.monotonic,
        max_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.config = config
        self.service = service
        # Client headers of these names never reach the upstream on a route that uses this
        # method: only the auth service's answer may supply them.
        self.owned_headers = frozenset(name.lower() for name in config.copy_headers)
        self._path = config.path
        self._copy = config.copy_headers
        self._ttl = config.cache
        self._clock = clock
        self._max = max_entries
        self._cache: OrderedDict[bytes, tuple[float, Decision]] = OrderedDict()

    async def authenticate(self, facts: RequestFacts) -> Identity | None:
        """An Identity, or Unauthenticated / Forbidden (relayed), or AuthUnavailable (503)."""
        credentials: Headers = [
            (name, value) for name in CREDENTIAL_HEADERS for value in facts.headers.getall(name, ())
        ]
        if self._ttl is None:
            return _outcome(await self._ask(facts, credentials))
        key = _digest(credentials)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            expires, decision = cached
            if now < expires:
                self._cache.move_to_end(key)
                return _outcome(decision)
            del self._cache[key]
        decision = await self._ask(facts, credentials)
        self._cache[key] = (self._clock() + self._ttl, decision)
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return _outcome(decision)

    @property
    def cached(self) -> int:
        """How many decisions the cache holds (for tests and stats)."""
        return len(self._cache)

    async def _ask(self, facts: RequestFacts, credentials: Headers) -> Decision:
        headers = [
            *credentials,
            (X_FORWARDED_METHOD, facts.method),
            (X_FORWARDED_URI, facts.path),
        ]
        host = facts.headers.get(hdrs.HOST)
        if host:
            headers.append((X_FORWARDED_HOST, host))
        name = self.service.name
        try:
            reply = await self.service.send("GET", self._path, headers, None, kind="auth")
        except UpstreamError as exc:
            if exc.call is not None:
                facts.calls.append(exc.call)
            raise AuthUnavailable(
                f"the auth service {name!r} gave no answer", headers=_retry_after(exc.headers)
            ) from exc
        facts.calls.append(reply.call)
        try:
            response = reply.response
            status = response.status
            if 200 <= status < 300:
                return _identity(CIMultiDictProxy(CIMultiDict(response.headers)), self._copy)
            if status in (401, 403):
                return status, _first(response.headers, "www-authenticate")
        finally:
            reply.release()  # an unread body closes the connection instead of pooling it
        raise AuthUnavailable(f"the auth service {name!r} answered {status}: no decision")


def _first(headers: list[tuple[str, str]], lowered: str) -> str | None:
    return next((value for name, value in headers if name.lower() == lowered), None)


def _identity(headers: CIMultiDictProxy[str], copy: tuple[istr, ...]) -> Identity:
    consumer = headers.get(X_CONSUMER, "").strip()
    subject = headers.get(X_AUTH_SUBJECT, "").strip() or consumer
    scopes = frozenset(headers.get(X_AUTH_SCOPES, "").split())
    copied = tuple((name, value) for name in copy for value in headers.getall(name, ()))
    return Identity(consumer, subject, scopes, "forward", copied)


def _outcome(decision: Decision) -> Identity:
    if isinstance(decision, Identity):
        return decision
    status, challenge = decision
    headers = {str(hdrs.WWW_AUTHENTICATE): challenge} if challenge else None
    error: GatewayError
    if status == 401:
        error = Unauthenticated("the auth service refused the credentials", headers=headers)
    else:
        error = Forbidden("the auth service does not allow this request", headers=headers)
    raise error


def _digest(credentials: Headers) -> bytes:
    """A cache key for the credential headers: their SHA-256, never the secret itself."""
    hashed = hashlib.sha256()
    for name, value in credentials:
        hashed.update(f"{name}\0{value}\0".encode("utf-8", "surrogateescape"))
    return hashed.digest()


def _retry_after(headers: Mapping[str, str]) -> dict[str, str] | None:
    value = headers.get("Retry-After")
    return {"Retry-After": value} if value else None


def forward_authenticator(
    config: ForwardAuthConfig | None, services: Mapping[str, Service]
) -> ForwardAuth | None:
    """The configured `forward` method for one table build, or None when there is none."""
    if config is None:
        return None
    return ForwardAuth(config, services[config.service])
