"""Every failure the gateway answers itself, and the one place they become HTTP responses.

GatewayError
  RouteNotFound 404 · MethodNotAllowed 405 · Unauthenticated 401 · Forbidden 403
  AuthUnavailable 503
  PayloadTooLarge 413 · RateLimited 429 · BadRequest 400 · RequestTimeout 408
  RateLimitUnavailable 503 (the Redis store failed and on_store_error is deny)
  MalformedRequest 400 · TargetTooLong 414 · HeadersTooLarge 431 · VersionNotSupported 505
    (these four close the connection: the rest of its bytes cannot be trusted)
  UpstreamError
    UpstreamUnavailable 502 · NoHealthyTarget 503 · PoolExhausted 503 · UpstreamTimeout 504
  PartFailed 502 · PartTimedOut 504 (an aggregate's required part; named, never its address)
  CallFailed 502 · CallTimedOut 504 (a compose handler's ctx.call that it did not handle)
  HandlerRefused (the status a compose handler's ctx.fail gave) · HandlerFailed 500
ResponseAborted: a failure after the response started; the connection is dropped.
ClientFailure: the base of the upstream client's errors (upstream/h1client.py), which
  `upstream_failure` translates: the one place they become the gateway's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import ClassVar, Final

import aiohttp
from aiohttp import hdrs, web

from gateway.http.exchange import EXCHANGE, UpstreamCall

logger = logging.getLogger(__name__)
upstream_log = logging.getLogger("gateway.upstream")

PROBLEM_TYPE: Final = "application/problem+json"
_NO_MEMBERS: Final[Mapping[str, object]] = {}


class GatewayError(Exception):
    status: int = 500
    title: str = "Internal Server Error"
    slug: str = "internal-error"  # the last part of the problem's `type` URI
    closes: ClassVar[bool] = False  # the connection is closed after this answer

    def __init__(self, detail: str = "", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.call: UpstreamCall | None = None  # the upstream call that failed, if one did
        self.members: Mapping[str, object] = _NO_MEMBERS  # extra problem members ("steps")


class BadRequest(GatewayError):
    status, title, slug = 400, "Bad Request", "bad-request"


class MalformedRequest(BadRequest):
    """A request the gateway will not parse further (a parser rejection, CONNECT, HTTP/0.9)."""

    slug = "malformed-request"
    closes: ClassVar[bool] = True


class TargetTooLong(MalformedRequest):
    status, title, slug = 414, "URI Too Long", "target-too-long"


class HeadersTooLarge(MalformedRequest):
    status, title, slug = 431, "Request Header Fields Too Large", "headers-too-large"


class VersionNotSupported(MalformedRequest):
    status, title, slug = 505, "HTTP Version Not Supported", "version-not-supported"


class RouteNotFound(GatewayError):
    status, title, slug = 404, "Not Found", "route-not-found"


class MethodNotAllowed(GatewayError):
    status, title, slug = 405, "Method Not Allowed", "method-not-allowed"
    route: str = ""  # the route whose prefix matched, for logs and metrics


class Unauthenticated(GatewayError):
    status, title, slug = 401, "Unauthorized", "unauthenticated"


class Forbidden(GatewayError):
    status, title, slug = 403, "Forbidden", "forbidden"


class AuthUnavailable(GatewayError):
    """The auth service gave no decision (an error, a timeout, an answer neither 2xx nor
    401/403): the request is refused, never admitted."""

    status, title, slug = 503, "Service Unavailable", "auth-unavailable"


class RequestTimeout(GatewayError):
    status, title, slug = 408, "Request Timeout", "request-timeout"


class PayloadTooLarge(GatewayError):
    status, title, slug = 413, "Content Too Large", "payload-too-large"


class RateLimited(GatewayError):
    status, title, slug = 429, "Too Many Requests", "rate-limited"


class RateLimitUnavailable(GatewayError):
    status, title, slug = 503, "Service Unavailable", "rate-limit-unavailable"


class UpstreamError(GatewayError):
    status, title, slug = 502, "Bad Gateway", "upstream-error"
    kind: ClassVar[str] = "error"  # the label upstream-error metrics carry


class UpstreamUnavailable(UpstreamError):
    status, title, slug = 502, "Bad Gateway", "upstream-unavailable"
    kind = "unavailable"


class NoHealthyTarget(UpstreamError):
    status, title, slug = 503, "Service Unavailable", "no-healthy-target"
    kind = "no_healthy_target"


class PoolExhausted(UpstreamError):
    status, title, slug = 503, "Service Unavailable", "pool-exhausted"
    kind = "pool_exhausted"


class UpstreamTimeout(UpstreamError):
    status, title, slug = 504, "Gateway Timeout", "upstream-timeout"
    kind = "timeout"


class PartFailed(GatewayError):
    status, title, slug = 502, "Bad Gateway", "part-failed"


class PartTimedOut(PartFailed):
    status, title, slug = 504, "Gateway Timeout", "part-timed-out"


class CallFailed(GatewayError):
    status, title, slug = 502, "Bad Gateway", "call-failed"


class CallTimedOut(CallFailed):
    status, title, slug = 504, "Gateway Timeout", "call-timed-out"


class HandlerRefused(GatewayError):
    """`ctx.fail(status, detail)`: the handler ends the request with that status (4xx/5xx);
    its compensations have run."""

    slug = "handler-refused"

    def __init__(self, status: int, detail: str, title: str) -> None:
        super().__init__(detail)
        self.status, self.title = status, title


class HandlerFailed(GatewayError):
    """A compose handler raised: 500, without the traceback (that is logged once)."""

    status, title, slug = 500, "Internal Server Error", "handler-failed"


class ResponseAborted(Exception):
    """The upstream failed after the response started: the client must see a broken body."""

    def __init__(self, service: str, response: web.StreamResponse) -> None:
        super().__init__(service)
        self.response = response


class ClientFailure(Exception):
    """A failure of the upstream HTTP client (gateway/upstream/h1client.py's H1Error is one):
    what `upstream_failure` needs to know of it, so this layer never imports the client."""

    summary: str = "connection error"  # for the problem's detail: never an address
    pool_full: ClassVar[bool] = False  # max_connections in use: 503 at once, nothing sent
    client_fault: ClassVar[bool] = False  # the request body's source failed: not the target


UpstreamFailure = TimeoutError | aiohttp.ClientError | ClientFailure


def upstream_failure(exc: UpstreamFailure, service: str) -> UpstreamError:
    """Translate a client failure before the first response byte; the detail names the
    service, never its address. Timeouts first: the clients' subclass TimeoutError."""
    if isinstance(exc, ClientFailure) and exc.pool_full:
        return PoolExhausted(
            f"service {service!r} has no free connection (max_connections)",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"service {service!r} did not answer in time")
    return UpstreamUnavailable(f"service {service!r} failed: {_describe(exc)}")


def send_failure(exc: UpstreamFailure, service: str, cut: Exception | None) -> GatewayError:
    """`upstream_failure`, unless the request's side failed: `cut` (why the gateway cut the
    request body: a 408, a 413), or a body whose source broke. Only an UpstreamError is the
    target's doing (its breaker hears it)."""
    if isinstance(cut, GatewayError):
        return cut
    if isinstance(exc, ClientFailure) and exc.client_fault:
        return BadRequest("the request body could not be read")
    return upstream_failure(exc, service)


def _describe(exc: aiohttp.ClientError | ClientFailure) -> str:
    match exc:
        case ClientFailure():
            return exc.summary
        case aiohttp.ClientConnectorCertificateError():
            return "its TLS certificate could not be verified"
        case aiohttp.ClientConnectorSSLError():
            return "the TLS handshake failed"
        case aiohttp.ClientConnectorError():
            return "connection refused or unreachable"
        case aiohttp.ServerDisconnectedError():
            return "connection closed before a response"
        case aiohttp.ClientResponseError():
            return "malformed response"
        case aiohttp.ClientOSError():
            return "connection reset"
    return "connection error"


class ProblemResponse(web.Response):
    """A response the gateway makes itself. It names no server software, and its status line
    is HTTP/1.1 whatever version the request claimed (RFC 9110 §2.5: the highest version the
    server conforms to), as nginx does: HTTP/2.0 and HTTP/0.9 requests are not answered in kind.
    """

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)  # aiohttp's own default: Python/... aiohttp/...

    async def _write_headers(self) -> None:
        writer = self._payload_writer
        assert writer is not None
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)


def problem_response(request: web.BaseRequest, error: GatewayError) -> web.Response:
    exchange = request.get(EXCHANGE)
    body = {
        "type": f"https://gateway.example/problems/{error.slug}",
        "title": error.title,
        "status": error.status,
        "detail": error.detail or error.title,
        "request_id": exchange.request_id if exchange else None,
    }
    if error.members:
        body.update(error.members)
    response = ProblemResponse(
        status=error.status, text=json.dumps(body), content_type=PROBLEM_TYPE, headers=error.headers
    )
    if error.closes:
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"  # said in any version (HTTP/1.0 too)
    return response


CLIENT_GONE: Final = 499  # nginx's status for "the client closed the connection first"


def problem_for(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The only place failures become statuses; the only place any Exception is caught."""
    match exc:
        case GatewayError():
            return problem_response(request, exc)
        case ResponseAborted():
            upstream_log.warning("service %r failed mid-response; connection dropped", str(exc))
            if request.transport is not None:
                request.transport.abort()  # no clean end: the client sees a broken body
            return exc.response
        case ConnectionResetError():
            # The client went away. Answer anything: aiohttp finds the connection closed when
            # it sends, and drops it quietly (a raised error would be logged as a bug).
            return web.Response(status=CLIENT_GONE)
        case web.HTTPException():  # raised by aiohttp itself (a body over client_max_size...)
            return problem_response(request, _from_http(exc))
    logger.exception("unhandled error while handling %s %s", request.method, request.path)
    return problem_response(request, GatewayError())


def _from_http(exc: web.HTTPException) -> GatewayError:
    error = GatewayError(exc.reason, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    error.status, error.title, error.slug = exc.status, exc.reason, "http-error"
    return error
