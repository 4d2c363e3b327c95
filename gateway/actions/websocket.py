"""WebSocket pass-through: the upgrade is made to a target first, then to the client, and
messages are pumped both ways until either side closes.

Messages are relayed whole, so each one is held in memory: one bigger than
`limits.max_message_bytes` (either way) closes the sender with 1009, and the other side with
1001 (a client failed: the target is told it went away) or 1014 (a target failed: the client is
told "bad gateway"). No compression is negotiated with either side (a client's
permessage-deflate offer is declined), so a small compressed frame cannot inflate inside the
gateway: a frame with RSV1 set is a protocol error (1002). A target that refuses the upgrade is
relayed as it answered: status, headers (hop-by-hop ones dropped) and body, streamed; redirects
are not followed.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Final

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs, web
from yarl import URL

from gateway.http.errors import UpstreamUnavailable, upstream_failure
from gateway.http.exchange import Exchange, UpstreamCall
from gateway.http.hopbyhop import relayed
from gateway.http.pipeline import UpstreamResponse
from gateway.upstream.service import RETRY_STATUSES, Headers, ProxyRequest, Service

logger = logging.getLogger(__name__)

_NORMAL: Final = aiohttp.WSCloseCode.OK
# How the side that did nothing wrong is closed when the other broke the protocol, sent a
# message over the limit, or vanished.
_CLIENT_FAILED: Final = aiohttp.WSCloseCode.GOING_AWAY  # told to the target
_TARGET_FAILED: Final = aiohttp.WSCloseCode.BAD_GATEWAY  # told to the client (1014)

_CLOSE_TIMEOUT: Final = 2.0  # seconds to wait for the peer's close frame
# The handshake headers aiohttp's client writes itself.
_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)


def is_websocket(request: web.BaseRequest) -> bool:
    return (
        request.method == "GET"
        and hdrs.UPGRADE in request.headers  # cheap test first: this runs on every request
        and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and "upgrade" in request.headers.get(hdrs.CONNECTION, "").lower()
    )


async def proxy_websocket(
    request: web.Request,
    service: Service,
    path_qs: str,
    headers: Headers,
    exchange: Exchange,
    max_message_bytes: int,
) -> UpstreamResponse | web.StreamResponse:
    """Upgrade to a target, then to the client, and pump frames both ways; a target that
    refuses the upgrade has its answer relayed instead."""
    protocols = [
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    ]
    # aiohttp refuses a message of exactly max_msg_size bytes: one more lets the limit pass.
    max_msg_size = max_message_bytes + 1
    target, ticket = service.choose()
    call = UpstreamCall(service.name, "websocket", target=target.label, attempts=1)
    exchange.calls += (call,)
    up_headers = [(k, v) for k, v in headers if k.lower() not in _HANDSHAKE]
    try:
        upstream = await _handshake_session(service).ws_connect(
            URL(target.url + path_qs, encoded=True),
            headers=up_headers,
            protocols=protocols,
            autoping=False,
            compress=0,
            max_msg_size=max_msg_size,
            timeout=aiohttp.ClientWSTimeout(ws_close=_CLOSE_TIMEOUT),
        )
    except _Refused as refused:
        # The target answered, only not with 101 (a 401, 403, 302...): relay its answer, and
        # count it against the target only when it is one of the failing statuses.
        call.status, call.outcome = refused.response.status, "ok"
        if refused.response.status in RETRY_STATUSES:
            target.breaker.failure(ticket)
        else:
            target.breaker.success(ticket)
        answer = refused.response
        exchange.from_upstream = True
        exchange.upstream_had_server = hdrs.SERVER in answer.headers
        exchange.upstream_had_type = hdrs.CONTENT_TYPE in answer.headers
        return UpstreamResponse(  # streamed back by the relay, like any response
            answer.status,
            relayed(answer.headers),
            answer.content,
            reason=answer.reason,
            release=answer.release,
            call=call,
        )
    except aiohttp.WSServerHandshakeError as exc:  # a 101 without a valid handshake
        target.breaker.failure(ticket)
        call.outcome = UpstreamUnavailable.kind
        raise UpstreamUnavailable(
            f"service {service.name!r} answered the upgrade with an invalid handshake"
        ) from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        target.breaker.failure(ticket)
        error = upstream_failure(exc, service.name)
        call.outcome = error.kind
        raise error from exc
    except BaseException:  # cancelled: the trial (if this was it) passes to the next request
        target.breaker.abandon(ticket)
        call.outcome = "cancelled"
        raise
    target.breaker.success(ticket)
    call.status, call.outcome = 101, "ok"
    target.in_flight += 1
    try:
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            autoping=False,
            compress=False,
            max_msg_size=max_msg_size,
            timeout=_CLOSE_TIMEOUT,
        )
        await client.prepare(request)
        await _pump_both(client, upstream)
        return client
    finally:  # closed already, unless the client left and this handler was cancelled
        target.in_flight -= 1
        await upstream.close(code=_CLIENT_FAILED)


class _Refused(Exception):
    """The target answered the upgrade request with something other than 101."""

    def __init__(self, response: ClientResponse) -> None:
        super().__init__(response.status)
        self.response = response


async def _stop_unless_switched(
    request: ClientRequest, handler: ClientHandlerType
) -> ClientResponse:
    """Hand a non-101 answer to the caller whole, before aiohttp follows a redirect or drops
    the body (its WSServerHandshakeError keeps the status and headers only)."""
    response = await handler(request)
    if response.status != 101:
        raise _Refused(response)
    return response


# Per service, a session for upgrades only: the service's pool, plus the middleware above
# (on the service's own session it would cost every plain request a call).
_sessions: weakref.WeakKeyDictionary[Service, aiohttp.ClientSession] = weakref.WeakKeyDictionary()


def _handshake_session(service: Service) -> aiohttp.ClientSession:
    session = _sessions.get(service)
    if session is None or session.closed:
        pool = service.session  # raises once the service was removed
        session = aiohttp.ClientSession(
            connector=pool.connector,
            connector_owner=False,  # the service's session closes the pool
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            request_class=ProxyRequest,
            timeout=service.timeout,
            middlewares=(_stop_unless_switched,),
        )
        session._retry_connection = False  # as the service's session (upstream.make_session)
        _sessions[service] = session
    return session


async def _pump_both(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Relay until either side stops, then close the other: with the code the side that
    closed sent, or one saying the other side failed."""
    to_upstream = asyncio.create_task(_pump(client, upstream, _CLIENT_FAILED))
    to_client = asyncio.create_task(_pump(upstream, client, _TARGET_FAILED))
    try:
        done, _ = await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
    if to_upstream in done:
        failed = to_upstream.cancelled() or to_upstream.exception() is not None
        code = _TARGET_FAILED if failed else to_upstream.result()  # failed: a send to it
    else:
        failed = to_client.cancelled() or to_client.exception() is not None
        code = _CLIENT_FAILED if failed else to_client.result()
    # Close only once no pump reads any more: a close() racing a reader waits for its timeout.
    # The side that stopped is closed already; this closes the other.
    await client.close(code=code)
    await upstream.close(code=code)


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: WebSocket, sink: WebSocket, failed: int) -> int:
    """Relay `source`'s messages to `sink`; return the code to close `sink` with: the one
    `source` closed with, or `failed` when aiohttp closed `source` for breaking the protocol
    (1002) or sending a message over the limit (1009), or it vanished."""
    async for message in source:
        match message.type:
            case aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            case aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            case aiohttp.WSMsgType.PING:
                await sink.ping(message.data)
            case aiohttp.WSMsgType.PONG:
                await sink.pong(message.data)
            case _:  # ERROR
                return failed
    return source.close_code or _NORMAL
