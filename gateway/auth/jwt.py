"""Bearer JWTs, verified with PyJWT: the key, the pinned algorithms and the claims checks.

A token is refused before PyJWT sees it when it is larger than `MAX_TOKEN_BYTES`, is not
three base64url segments, or has a header that is not UTF-8 JSON (RFC 7515 §4: PyJWT's
`json.loads` would also read UTF-16). The algorithm must be one of the route's pinned ones
*and* fit the key's type, so an HS256 token "signed" with an RSA public key never verifies.
A verified token is cached by its exact text until its `exp` (at most `MAX_CACHE_SECONDS`),
in a bounded LRU, so repeating an RS256 token costs a dict lookup; a change of the JWKS key
set drops every cached verdict.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol, TypeGuard

import jwt
from multidict import CIMultiDictProxy

from gateway.auth.identity import CredentialRejected, Identity, RequestFacts
from gateway.config.jwtkeys import PublicKey

MAX_TOKEN_BYTES: Final = 8192  # a larger bearer token is refused unparsed
MAX_CACHE_SECONDS: Final = 300.0  # a verdict is reused at most this long (tokens without exp)
CACHE_SIZE: Final = 10_000  # verified tokens kept per auth.jwt config (LRU)
MAX_NAME_CHARS: Final = 256  # a consumer, subject or scope longer than this is refused

_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SANE_NAME: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # visible ASCII


class VerifyKey(NamedTuple):
    key: PublicKey | bytes
    algorithms: tuple[str, ...]  # the pinned algorithms this key may verify


class KeySource(Protocol):
    """Where verification keys come from: one fixed key, or a JWKS."""

    generation: int  # changes whenever the keys change: cached verdicts are then dropped

    async def find(self, kid: str | None) -> VerifyKey | None: ...


@dataclass(slots=True)
class StaticKey:
    """A secret or a public key from the config: the same for every token."""

    key: VerifyKey
    generation: int = 0

    async def find(self, kid: str | None) -> VerifyKey | None:
        return self.key


@dataclass(frozen=True, slots=True)
class JwtRules:
    algorithms: frozenset[str]
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 0.0  # seconds
    consumer_claim: str = "sub"


class _Verdict(NamedTuple):
    identity: Identity
    until: float  # time.time() after which the token is verified again
    generation: int


class JwtAuthenticator:
    """`Authorization: Bearer <jwt>` -> Identity, or CredentialRejected with the reason."""

    __slots__ = ("_cache", "_clock", "_keys", "_options", "_rules", "_size")

    def __init__(
        self,
        rules: JwtRules,
        keys: KeySource,
        clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._rules, self._keys, self._clock, self._size = rules, keys, clock, cache_size
        self._cache: OrderedDict[str, _Verdict] = OrderedDict()
        self._options: Any = {  # PyJWT's Options TypedDict; only these differ from its defaults
            "verify_aud": rules.audience is not None,
            "enforce_minimum_key_length": True,  # refuse, never warn, on a short JWKS key
        }

    async def authenticate(self, facts: RequestFacts) -> Identity | None:
        token = bearer_token(facts.headers)
        if token is None:
            return None
        verdict = self._cache.get(token)
        if verdict is not None:
            if verdict.until > self._clock() and verdict.generation == self._keys.generation:
                self._cache.move_to_end(token)
                return verdict.identity
            del self._cache[token]
        generation = self._keys.generation
        claims = await self._verify(token)
        identity = identity_of(claims, self._rules.consumer_claim)
        self._remember(token, _Verdict(identity, self._until(claims), generation))
        return identity

    async def _verify(self, token: str) -> dict[str, Any]:
        header = token_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._rules.algorithms:
            raise CredentialRejected("the token's algorithm is not accepted here")
        key = await self._keys.find(kid if isinstance(kid, str) else None)
        if key is None:
            raise CredentialRejected("the token's signing key is not known")
        if alg not in key.algorithms:
            raise CredentialRejected("the token's algorithm does not fit its key")
        rules = self._rules
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                options=self._options,
                audience=rules.audience,
                issuer=rules.issuer,
                leeway=rules.leeway,
            )
        except jwt.PyJWTError as exc:
            raise CredentialRejected(_reason(exc)) from None

    def _until(self, claims: Mapping[str, Any]) -> float:
        cap = self._clock() + MAX_CACHE_SECONDS
        exp = claims.get("exp")
        return min(float(exp), cap) if isinstance(exp, int | float) else cap

    def _remember(self, token: str, verdict: _Verdict) -> None:
        self._cache[token] = verdict
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)


def bearer_token(headers: CIMultiDictProxy[str]) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 9110
    §11.1), or None when no bearer credential was sent. A huge one is refused here."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    if len(token) > MAX_TOKEN_BYTES:
        raise CredentialRejected(f"the token is larger than {MAX_TOKEN_BYTES} bytes")
    return token.strip()


def token_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, read strictly: base64url only, UTF-8 JSON object."""
    if not _COMPACT.fullmatch(token):
        raise CredentialRejected("the token is not a compact JWT")
    segment = token[: token.index(".")]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CredentialRejected("the token's header is not base64url UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise CredentialRejected("the token's header is not a JSON object")
    return header


def identity_of(claims: Mapping[str, Any], consumer_claim: str) -> Identity:
    consumer = claims.get(consumer_claim)
    if not _sane(consumer):
        raise CredentialRejected(f"the token's {consumer_claim!r} claim names no usable consumer")
    subject = claims.get("sub", consumer)
    if not _sane(subject):
        raise CredentialRejected("the token's 'sub' claim is not a usable name")
    return Identity(consumer, subject, scopes_of(claims), "jwt")


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """`scope` (space-separated, RFC 8693 §4.2) or `scp` (a list, or a string as Azure AD)."""
    raw = claims.get("scope", claims.get("scp"))
    items = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if not all(_sane(s) and " " not in s for s in items):
        raise CredentialRejected("the token's scopes are not plain names")
    return frozenset(items)


def _sane(name: object) -> TypeGuard[str]:
    """Visible ASCII with inner spaces only: it goes into an upstream header as it is."""
    return (
        isinstance(name, str) and len(name) <= MAX_NAME_CHARS and bool(_SANE_NAME.fullmatch(name))
    )


def _reason(exc: jwt.PyJWTError) -> str:
    match exc:
        case jwt.ExpiredSignatureError():
            return "the token has expired"
        case jwt.ImmatureSignatureError():
            return "the token is not valid yet"
        case jwt.InvalidIssuerError():
            return "the token's issuer is not accepted"
        case jwt.InvalidAudienceError():
            return "the token's audience is not accepted"
        case jwt.MissingRequiredClaimError():
            return f"the token lacks the {exc.claim!r} claim"
        case jwt.InvalidSignatureError():
            return "the token's signature does not verify"
        case jwt.InvalidAlgorithmError() | jwt.InvalidKeyError():
            return "the token's algorithm does not fit its key"
    return "the token is malformed"
