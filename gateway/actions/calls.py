"""One JSON request to a service on a client request's behalf: what an aggregate part and a
compose handler's `ctx.call` have in common.

The request goes through `Service.send` (pools, balancing, retries, breakers) with the same
identity headers as a forwarded request (X-Forwarded-*, X-Request-ID, traceparent, the auth
stage's X-Consumer and the route's header rules), less what describes the client's own body
or asks for a representation the gateway could not read: the client's body is not sent, and
an answer must arrive uncompressed and whole to be parsed. The answer's body is read into
memory up to a cap; a bigger one is a failure.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.actions.forward import upstream_headers
from gateway.config.model import RouteConfig
from gateway.http.errors import ClientFailure, GatewayError, UpstreamTimeout
from gateway.http.exchange import Exchange, UpstreamCall
from gateway.http.pipeline import Body
from gateway.upstream.service import Headers, Service

# Client headers a sub-request never carries: they describe the client's body (not sent),
# ask for an encoding the gateway would have to undo, or make the answer conditional or
# partial (a 304 or 206 is not the JSON the caller wants).
NOT_FOR_CALLS: Final = frozenset(
    {"content-length", "content-type", "content-encoding", "content-md5", "content-digest",
     "digest", "expect", "accept-encoding", "range", "if-range", "if-match", "if-none-match",
     "if-modified-since", "if-unmodified-since"}
)  # fmt: skip


def call_headers(request: web.BaseRequest, exchange: Exchange, route: RouteConfig) -> Headers:
    """The identity headers every part or call of this request carries (computed once)."""
    return [
        item
        for item in upstream_headers(request, exchange, route)
        if item[0].lower() not in NOT_FOR_CALLS
    ]


class BodyTooLarge(GatewayError):
    """An answer body over the route's `max_part_bytes` (reported as the part's failure)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    call: UpstreamCall


def budget(service: Service, seconds: float | None) -> aiohttp.ClientTimeout | None:
    """The service's timeouts with `total` cut to `seconds` (None: the service's own)."""
    base = service.timeout
    if seconds is None:
        return None
    total = seconds if base.total is None else min(base.total, seconds)
    return aiohttp.ClientTimeout(
        total=max(total, 0.001),
        connect=base.connect,
        sock_connect=base.sock_connect,
        sock_read=base.sock_read,
    )


async def fetch(
    service: Service,
    method: str,
    path_qs: str,
    headers: Headers,
    body: bytes | None,
    seconds: float | None,
    limit: int,
    kind: str,
) -> Fetched:
    """Send, then read the whole answer (at most `limit` bytes) within `seconds`. Raises the
    upstream layer's GatewayError (with `.call`), or BodyTooLarge / UpstreamTimeout for the
    body, which carry the call too."""
    reply = await service.send(method, path_qs, headers, body, budget(service, seconds), kind=kind)
    response, call = reply.response, reply.call
    answered = CIMultiDictProxy(CIMultiDict(response.headers))
    try:
        async with asyncio.timeout(seconds):
            data = await _read_capped(response, _length(answered), limit)
    except TimeoutError as exc:
        error: GatewayError = UpstreamTimeout(f"service {service.name!r} did not answer in time")
        error.call, call.outcome = call, "timeout"
        raise error from exc
    except ClientFailure as exc:
        error = GatewayError(f"service {service.name!r} broke off its answer")
        error.call, call.outcome = call, "aborted"
        raise error from exc
    except BodyTooLarge as too_large:
        too_large.call, call.outcome = call, "too_large"
        raise
    finally:
        reply.release()
    return Fetched(response.status, answered, data, call)


def _length(headers: CIMultiDictProxy[str]) -> int | None:
    value = headers.get(hdrs.CONTENT_LENGTH, "")
    return int(value) if value.isdigit() else None


async def _read_capped(content: Body, length: int | None, limit: int) -> bytes:
    detail = f"its answer is larger than this route's max_part_bytes ({limit} bytes)"
    if length is not None and length > limit:
        raise BodyTooLarge(detail)
    chunks, seen = [], 0
    while chunk := await content.readany():
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(detail)
        chunks.append(chunk)
    return b"".join(chunks)
