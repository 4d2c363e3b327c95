"""A route's auth policy: which methods may prove who the caller is, which scopes each HTTP
method needs, which consumers may come in, and what the upstream is told about the caller.

Decided once per route at compile time; a request costs the authenticators' lookups and a few
set operations. Refusals are the gateway's 401 and 403 problems, with RFC 6750 challenges.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gateway.auth.identity import (
    Authenticator,
    CredentialRejected,
    Identify,
    Identity,
    Method,
    RequestFacts,
)
from gateway.config.model import ALL_METHODS
from gateway.http.errors import Forbidden, Unauthenticated

REALM: Final = 'realm="gateway"'
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "x-api-key"})  # strip_credentials
NEEDS: Final = {"jwt": "a bearer token", "api_key": "an API key", "forward": "credentials"}


def scopes_by_method(scopes: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """The scopes each method needs: its own entry, else "*" (HEAD without an entry of its
    own needs what GET needs, since a GET route serves HEAD too)."""
    fallback = scopes.get("*", frozenset())
    needs = {method: scopes.get(method, fallback) for method in ALL_METHODS}
    if "HEAD" not in scopes and "GET" in scopes:
        needs["HEAD"] = scopes["GET"]
    return needs


class RoutePolicy:
    __slots__ = (
        "_any_of",
        "_consumers",
        "_identify",
        "_key_challenge",
        "_needs",
        "_wanted",
        "strip",
        "synchronous",
    )

    def __init__(
        self,
        any_of: tuple[Method, ...],
        authenticators: Mapping[Method, Authenticator],
        scopes: Mapping[str, frozenset[str]],
        consumers: frozenset[str] | None = None,
        strip_credentials: bool = False,
    ) -> None:
        self._any_of = tuple((name, authenticators[name]) for name in any_of)
        # Every method answers without waiting (API keys): `admit_now`, a plain call, admits.
        identifies: list[Identify | None] = [
            getattr(authenticator, "identify", None) for _, authenticator in self._any_of
        ]
        self._identify: tuple[tuple[Method, Identify], ...] | None = None
        if all(identifies):
            self._identify = tuple(zip(any_of, identifies, strict=True))  # type: ignore[arg-type]
        self.synchronous = self._identify is not None
        self._needs = scopes_by_method(scopes)
        self._consumers = consumers
        # Names never sent up as the client wrote them: its credentials when asked, and the
        # headers a forward auth service's answer stands for (copy_headers).
        strip = CREDENTIAL_HEADERS if strip_credentials else frozenset()
        for _, authenticator in self._any_of:
            strip |= getattr(authenticator, "owned_headers", frozenset())
        self.strip: frozenset[str] = strip
        self._key_challenge = (f"ApiKey {REALM}",) if "api_key" in any_of else ()
        self._wanted = " or ".join(dict.fromkeys(NEEDS[name] for name in any_of))

    async def admit(self, facts: RequestFacts) -> Identity:
        """The caller's identity, or Unauthenticated (401) / Forbidden (403)."""
        if self._identify is not None:
            return self.admit_now(facts)
        rejected: dict[Method, str] = {}
        for name, authenticator in self._any_of:
            try:
                identity = await authenticator.authenticate(facts)
            except CredentialRejected as exc:
                rejected[name] = str(exc)
                continue
            if identity is not None:
                self._authorize(identity, facts.method)
                return identity
        raise self._unauthenticated(rejected)

    def admit_now(self, facts: RequestFacts) -> Identity:
        """`admit` as a plain call, for a policy whose methods all answer without waiting
        (`synchronous`)."""
        assert self._identify is not None
        rejected: dict[Method, str] = {}
        for name, identify in self._identify:
            try:
                identity = identify(facts)
            except CredentialRejected as exc:
                rejected[name] = str(exc)
                continue
            if identity is not None:
                self._authorize(identity, facts.method)
                return identity
        raise self._unauthenticated(rejected)

    def _authorize(self, identity: Identity, method: str) -> None:
        needs = self._needs.get(method)
        if needs and not needs <= identity.scopes:
            shown = " ".join(sorted(needs - identity.scopes))
            raise Forbidden(
                f"this request needs the scope {shown}",
                headers={"WWW-Authenticate": _forbidden_challenge(shown)},
            )
        if self._consumers is not None and identity.consumer not in self._consumers:
            raise Forbidden(
                "this consumer may not use this route",
                headers={"WWW-Authenticate": _forbidden_challenge("")},
            )

    def _unauthenticated(self, rejected: Mapping[Method, str]) -> Unauthenticated:
        bearer = f"Bearer {REALM}"
        if "jwt" in rejected:  # RFC 6750 §3.1: a token was sent and failed
            bearer += f', error="invalid_token", error_description="{rejected["jwt"]}"'
        challenges = (bearer, *self._key_challenge)
        detail = "; ".join(rejected.values()) or f"this route needs {self._wanted}"
        return Unauthenticated(detail, headers={"WWW-Authenticate": ", ".join(challenges)})


def _forbidden_challenge(scope: str) -> str:
    """RFC 6750 §3.1 insufficient_scope, naming the scope needed when there is one."""
    scope_part = f', scope="{scope}"' if scope else ""
    return f'Bearer {REALM}, error="insufficient_scope"{scope_part}'
