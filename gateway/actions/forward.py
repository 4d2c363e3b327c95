"""The streaming forwarder: what goes up, what comes back, and nothing else.

Request headers lose hop-by-hop fields (RFC 9110 §7.6.1) and the ones the gateway owns, then
gain X-Forwarded-*, X-Request-ID and traceparent. Bodies stream both ways; upstream bytes are
never decompressed or re-encoded. Target choice and retries belong to `upstream.Service`.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from aiohttp.streams import EmptyStreamReader
from multidict import istr

from gateway.actions.websocket import is_websocket, proxy_websocket
from gateway.config.model import DEFAULT_MAX_MESSAGE_BYTES, RouteConfig
from gateway.http.bodywatch import BodyWatch
from gateway.http.errors import GatewayError, UpstreamUnavailable
from gateway.http.exchange import TRACEPARENT, X_REQUEST_ID, Exchange
from gateway.http.hopbyhop import REQUEST_DROP, connection_listed, relayed_pairs
from gateway.http.pipeline import Action, UpstreamResponse
from gateway.http.proxies import X_FORWARDED_FOR
from gateway.http.routing import strip
from gateway.upstream.service import Headers, Service, client_timeout

X_FORWARDED_PROTO: Final = istr("X-Forwarded-Proto")
X_FORWARDED_HOST: Final = istr("X-Forwarded-Host")
X_FORWARDED_PREFIX: Final = istr("X-Forwarded-Prefix")
# The headers written below: a stage's header of one of these names replaces the one written.
WRITTEN_HERE: Final = frozenset(
    name.lower()
    for name in (
        X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID, TRACEPARENT, X_FORWARDED_HOST,
        X_FORWARDED_PREFIX,
    )
)  # fmt: skip


def upstream_headers(request: web.BaseRequest, exchange: Exchange, route: RouteConfig) -> Headers:
    """The header list for the upstream request (a plain list: the client encodes it as is).
    Client names holding "_" are dropped unless the route allows them: WSGI and CGI fold
    X_Consumer and X-Consumer into one variable, so one could pass for the other."""
    incoming = request.headers
    drop = REQUEST_DROP
    if hdrs.CONNECTION in incoming:  # the names it lists are hop-by-hop too
        drop = connection_listed(incoming, REQUEST_DROP)
    if exchange.upstream_remove:  # a route's remove rules, and the names its set rules own
        drop = drop | exchange.upstream_remove
    if route.underscores_in_headers:  # allowed, but compared as WSGI/CGI read them (_ is -)
        if drop is not REQUEST_DROP:  # Connection-listed or route names may be spelt with _
            drop = frozenset(name.replace("_", "-") for name in drop)
        out = [(n, v) for n, v in incoming.items() if n.lower().replace("_", "-") not in drop]
    else:  # nginx's underscores_in_headers off: X_Consumer never becomes HTTP_X_CONSUMER
        out = [(n, v) for n, v in incoming.items() if "_" not in n and n.lower() not in drop]
    chain = exchange.forwarded_for  # set by dispatch from the trusted-proxy rules
    peer = request.remote or ""
    if chain is None:  # the peer is no trusted proxy: what this connection says
        forwarded_for, proto = peer, request.scheme
        host = incoming.get(hdrs.HOST)
    else:  # a trusted proxy: its X-Forwarded-* are believed and extended
        forwarded_for = f"{chain}, {peer}" if chain else peer
        proto = incoming.get(X_FORWARDED_PROTO) or request.scheme
        host = incoming.get(X_FORWARDED_HOST) or incoming.get(hdrs.HOST)
    out += (
        (X_FORWARDED_FOR, forwarded_for),
        (X_FORWARDED_PROTO, proto),
        (X_REQUEST_ID, exchange.request_id),
        (TRACEPARENT, exchange.traceparent),
    )
    if host:
        out.append((X_FORWARDED_HOST, host))
    if route.strip_prefix and route.prefix != "/":
        out.append((X_FORWARDED_PREFIX, route.prefix))
    extra = exchange.upstream_set
    if extra:
        # The client's headers of names in `drop` are gone already (auth's X-Consumer...):
        # only a name outside it, or one written above, can be in `out` too.
        for name, _ in extra:
            lowered = name.lower()
            if lowered in WRITTEN_HERE or lowered not in drop:
                owned = {name.lower() for name, _ in extra}
                out = [item for item in out if item[0].lower() not in owned]
                break
        out += extra
    return out


def upstream_path(route: RouteConfig, exchange: Exchange) -> str:
    path = strip(route.prefix, exchange.path) if route.strip_prefix else exchange.path
    return path + exchange.query


def forward_action(
    route: RouteConfig, service: Service, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Action:
    """The `service` action: send the request on and hand back the upstream's response for
    the relay to stream. It never touches the client (a WebSocket upgrade aside: that one is
    answered whole by actions/websocket.py)."""
    timeout = None if route.timeouts == service.config.timeouts else client_timeout(route.timeouts)
    idle = route.timeouts.read  # also the silence allowed in a client's request body
    strip_prefix = route.strip_prefix

    async def forward(request: web.Request, exchange: Exchange) -> Forwarded:
        headers = upstream_headers(request, exchange, route)
        path = exchange.path  # upstream_path, inline
        path_qs = (strip(route.prefix, path) if strip_prefix else path) + exchange.query
        if hdrs.UPGRADE in request.headers and is_websocket(request):
            return await proxy_websocket(
                request, service, path_qs, headers, exchange, max_message_bytes
            )
        body = exchange.body
        if body is None:
            content = request.content
            if type(content) is not EmptyStreamReader:  # request.body_exists, inline
                body = content
        watch = (
            None
            if body is None or idle is None
            else BodyWatch(request.content, idle, exchange, route.min_body_rate)
        )
        try:
            reply = await service.send(
                request.method,
                path_qs,
                headers,
                body,
                timeout,
                body_error=None if body is None else exchange.cut,
            )
        except GatewayError as error:
            if error.call is not None:
                exchange.calls += (error.call,)
            raise
        finally:
            if watch is not None:
                watch.cancel()  # headers are back: a body still going is the upstream's choice
        exchange.calls += (reply.call,)
        upstream = reply.response
        if upstream.status == 101:  # the connection now speaks something else: drop it
            upstream.close()
            reply.release()
            raise UpstreamUnavailable(f"service {service.name!r} switched protocols unasked")
        relay_headers, had_server, had_type = relayed_pairs(upstream.headers)
        exchange.from_upstream = True
        exchange.upstream_had_server = had_server
        exchange.upstream_had_type = had_type
        return UpstreamResponse(
            upstream.status,
            relay_headers,
            upstream,
            reason=upstream.reason,
            release=reply.release,
            call=reply.call,
        )

    return forward


Forwarded = UpstreamResponse | web.StreamResponse
