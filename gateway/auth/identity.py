"""Who a request is, and the one interface every authentication method implements.

An `Authenticator` (jwt, api_key, forward) looks at a request's facts before its body is read
and answers one of three ways: an `Identity` (admitted as that identity), None (no credential
of its kind was sent), or `CredentialRejected` (one was sent and is no good). The route policy
tries the route's methods in turn; a `GatewayError` raised by a method (a relayed 401/403, a
503 from an auth service that did not answer) is the request's answer as it stands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from multidict import CIMultiDictProxy

from gateway.config.model import AuthMethod
from gateway.http.exchange import UpstreamCall

Method = AuthMethod  # jwt | api_key | forward


@dataclass(frozen=True, slots=True)
class Identity:
    consumer: str  # who is calling: a JWT's consumer_claim, an API key's consumer, ...
    subject: str  # the authenticated subject (a JWT's `sub`); the consumer when there is none
    scopes: frozenset[str]
    method: Method  # which method proved it
    headers: tuple[tuple[str, str], ...] = ()  # extra headers for the upstream (copy_headers)
    # `upstream_headers(self)`, made ahead by an authenticator whose identities outlive a
    # request (an API key's: one per key per config); () when it is made per request.
    sent_up: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)


def upstream_headers(identity: Identity) -> tuple[tuple[str, str], ...]:
    """What the upstream is told (the client's own headers of these names never go up)."""
    return (
        ("X-Consumer", identity.consumer),
        ("X-Auth-Subject", identity.subject),
        ("X-Auth-Scopes", " ".join(sorted(identity.scopes))),
        *identity.headers,
    )


def with_upstream_headers(identity: Identity) -> Identity:
    """`identity` with `sent_up` made: for identities made once and reused per request."""
    return replace(identity, sent_up=upstream_headers(identity))


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen one costs more
class RequestFacts:
    """What an authenticator may look at: never the body, which is not read yet."""

    method: str
    path: str  # normalized, without the query
    headers: CIMultiDictProxy[str]
    calls: list[UpstreamCall] = field(default_factory=list)  # sub-requests made to decide


class CredentialRejected(Exception):
    """A credential was sent and failed. The message is for the 401's detail: it says what
    was wrong (expired, bad signature, unknown key) and never quotes the credential."""


class Authenticator(Protocol):
    async def authenticate(self, facts: RequestFacts) -> Identity | None: ...


# What an authenticator that never waits may also offer as `identify`: `authenticate` as a
# plain call (the policy then runs no coroutine of its own for it).
Identify = Callable[[RequestFacts], Identity | None]
