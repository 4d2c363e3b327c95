"""The request pipeline's types: the phases a stage acts in, what an action produces, and the
chain a route runs. Envoy's decode/encode filter split and lura's proxy stack, in Python:

    request phase   each stage's `on_request`, in order: method, path, headers and client
                    only; no body byte has been read. The first stage that answers ends it
                    (a preflight, a cache hit) and one that raises refuses (401, 413, 429...).
                    It runs before `100 Continue` is decided, so a refused request is never
                    invited to send its body. An answer that is a finished web.StreamResponse
                    (a cache hit whose bytes the cache encoded) skips the next two phases.
    action          what answers the route: forward | aggregate | compose. It produces an
                    `UpstreamResponse` and never touches the client.
    response phase  each stage's `on_response`, innermost first: edit status and headers, wrap
                    the body (the cache's tee).
    relay           servers/public.py writes the result to the client: the one writer, which
                    owns the client-side limits.

The list that orders the stages is in `runtime/assemble.py`, which imports the stages; the
stages import these types. Neither imports the other in a loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from aiohttp import web
from aiohttp.http import HttpVersion
from multidict import CIMultiDictProxy

from gateway.http.exchange import Exchange, UpstreamCall

if TYPE_CHECKING:
    from gateway.http.routing import Route

Headers = list[tuple[str, str]]


class Body(Protocol):
    """A response body as it arrives: `readany()` returns b"" at its end (aiohttp's
    StreamReader is one)."""

    async def readany(self) -> bytes: ...


class UpstreamResponse:
    """What an action (or an answering stage) produces: status, headers and the body, either
    whole (`bytes`) or as a stream. `release()` hands back what the body holds (its pooled
    connection); the relay calls it once the body is written or abandoned."""

    __slots__ = ("body", "call", "headers", "reason", "release", "status")

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: Body | bytes = b"",
        *,
        reason: str | None = None,
        release: Callable[[], None] | None = None,
        call: UpstreamCall | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # end-to-end only: hop-by-hop ones are already gone
        self.body = body
        self.release = release
        self.call = call  # the upstream call it came from; None for the gateway's own answers


# What a request-phase stage returns: None goes on. A finished `web.StreamResponse` (a cache
# hit whose bytes the cache encoded) is sent as it is: it has no response phase and no relay.
Answer = UpstreamResponse | web.StreamResponse | None
# What an action gives back: a response to relay, or one it already wrote (a WebSocket).
Action = Callable[[web.Request, Exchange], Awaitable[UpstreamResponse | web.StreamResponse]]


@runtime_checkable
class RequestStage(Protocol):
    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer: ...


@runtime_checkable
class ResponseStage(Protocol):
    async def on_response(self, exchange: Exchange, up: UpstreamResponse) -> UpstreamResponse: ...


class LaneHit(NamedTuple):
    """A cache hit answered in the hit lane: the bytes sent, status and body length (a HEAD's
    too), for the metrics and access line."""

    wire: bytes
    status: int
    length: int


class LaneCache(Protocol):
    """The cache stage as the hit lane (servers/hitlane.py) calls it: what `on_request` answers
    at once for a fresh, in-memory, unconditional hit, as bytes; None for anything else."""

    def lane_hit(
        self,
        exchange: Exchange,
        method: str,
        headers: CIMultiDictProxy[str],
        version: HttpVersion,
        keep_alive: bool,
    ) -> LaneHit | None: ...


@dataclass(frozen=True, slots=True)
class Lane:
    """A route whose request phase, for a GET or HEAD without a body, is synchronous steps
    and then the cache stage: the hit lane may answer its hits from the connection's
    data_received (servers/hitlane.py). `steps` are the stages before the cache (their
    `without_body`), in order."""

    steps: tuple[Callable[[Exchange], None], ...]
    cache: LaneCache


@dataclass(frozen=True, slots=True)
class Chain:
    """One route's stages by phase and its action, built once per load. A stage the route
    does not configure is in neither tuple: an unconfigured feature costs nothing."""

    request: tuple[RequestStage, ...]
    action: Action
    response: tuple[ResponseStage, ...]
    names: tuple[str, ...]  # the stages in order, then the action: what /routes shows
    lane: Lane | None = None  # set when the hit lane may answer this route's hits


class Prepared(NamedTuple):
    """What the `Expect: 100-continue` handler found before the body was invited: the route,
    and the request phase's answer or refusal. The dispatcher goes on from there."""

    route: Route | None  # None when routing itself refused it (404, 405)
    answer: Answer
    refusal: Exception | None
