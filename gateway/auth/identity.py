"""Who a request is, and the one interface every authentication method implements.

An `Authenticator` (jwt, api_key, forward) looks at a request's facts before its body is read
and answers one of three ways: an `Identity` (admitted as that identity), None (no credential
of its kind was sent), or `CredentialRejected` (one was sent and is no good). The route policy
tries the route's methods in turn; a `GatewayError` raised by a method (a relayed 401/403, a
503 from an auth service that did not answer) is the request's answer as it stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
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
