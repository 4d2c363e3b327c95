"""WebSocket pass-through: the upgrade is made to a target first, then to the client, and
frames are pumped both ways until either side closes."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from gateway.errors import upstream_failure
from gateway.exchange import Exchange
from gateway.upstream import RETRY_STATUSES, Headers, Service

logger = logging.getLogger(__name__)

_NORMAL: Final = aiohttp.WSCloseCode.OK

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
) -> web.StreamResponse:
    protocols = [
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    ]
    target, trial = service.choose()
    exchange.target = target.label
    up_headers = [(k, v) for k, v in headers if k.lower() not in _HANDSHAKE]
    try:
        upstream = await service.session.ws_connect(
            URL(target.url + path_qs, encoded=True),
            headers=up_headers,
            protocols=protocols,
            autoping=False,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=_CLOSE_TIMEOUT),
        )
    except aiohttp.WSServerHandshakeError as refused:
        # The target answered, only not with 101 (a 401, 403, 404...): relay its status, and
        # count it against the target only when it is one of the failing ones.
        if refused.status in RETRY_STATUSES:
            target.breaker.failure()
        else:
            target.breaker.success()
        return web.Response(status=refused.status)
    except (TimeoutError, aiohttp.ClientError) as exc:
        target.breaker.failure()
        raise upstream_failure(exc, service.name) from exc
    except BaseException:  # cancelled: the trial (if this was it) passes to the next request
        target.breaker.abandon(trial)
        raise
    target.breaker.success()
    target.in_flight += 1
    try:
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            autoping=False,
            max_msg_size=0,
        )
        await client.prepare(request)
        await _pump_both(client, upstream)
        return client
    finally:
        target.in_flight -= 1
        await upstream.close()


async def _pump_both(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Relay until either side closes, then close the other with the same code."""
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    try:
        done, _ = await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
    # Close only once no pump reads any more: a close() racing a reader waits for its timeout.
    code = (client.close_code if to_upstream in done else upstream.close_code) or _NORMAL
    await client.close(code=code)
    await upstream.close(code=code)


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: WebSocket, sink: WebSocket) -> None:
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
            case _:
                return
