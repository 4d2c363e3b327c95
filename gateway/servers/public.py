"""The public application: one catch-all handler that matches the current route table and
runs the route's chain, with what app middlewares would do (the Exchange, problem+json, the
access line and metrics) in the same frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from gateway.http.errors import (
    CLIENT_GONE,
    MalformedRequest,
    MethodNotAllowed,
    VersionNotSupported,
    problem_for,
)
from gateway.http.exchange import (
    EXCHANGE,
    Exchange,
    apply_exchange,
    exchange_for,
    start_exchange,
)
from gateway.http.pipeline import Answer, Chain, Prepared, UpstreamResponse
from gateway.http.relay import relay
from gateway.http.routing import Route, RouteTable, normalize_path
from gateway.ops.accesslog import Requested
from gateway.runtime.reload import Reloader
from gateway.runtime.state import GATEWAY, Gateway

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import _InfoDict  # the type get_info must return

config_log = logging.getLogger("gateway.config")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_dispatch(gateway: Gateway) -> Handler:
    """The one handler of the public app: match, the request phase, the action, the response
    phase, the relay. It also does what app middlewares would (the Exchange, problem+json, the
    access line and metrics) in the same frame: on a route with no feature this is most of the
    gateway's own cost, so it is kept flat."""
    metrics, tracer = gateway.metrics, gateway.tracer
    finished = make_recorder(gateway)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        # Only a request that says `Expect` can have met the Expect handler, which began its
        # Exchange and request phase; the header test is cheaper than the request's mapping.
        exchange = request.get(EXCHANGE) if hdrs.EXPECT in request.headers else None
        if exchange is None:
            exchange = exchange_for(request.headers)  # start_exchange, inline
            request[EXCHANGE] = exchange
            if tracer is not None:
                tracer.begin(exchange, request)
        status, sent = CLIENT_GONE, 0  # until an answer exists: the client went away first
        metrics.active += 1
        try:
            try:
                prepared = exchange.prepared
                if prepared is None:
                    route = enter(gateway.table, request, exchange)
                    chain = route.chain
                    answer = None
                    for step in chain.request:  # request_phase, inline: one frame less
                        answer = await step.on_request(exchange, request)
                        if answer is not None:
                            break
                else:
                    found, answer, refusal = prepared
                    if refusal is not None:
                        raise refusal
                    assert found is not None  # no refusal: routing found it
                    chain = found.chain
                up = answer if answer is not None else await chain.action(request, exchange)
                if type(up) is UpstreamResponse:
                    for stage in chain.response:
                        up = await stage.on_response(exchange, up)
                    response = await relay(request, exchange, up)
                else:  # an action that answered the client itself (a WebSocket)
                    assert isinstance(up, web.StreamResponse)
                    response = up
            except MethodNotAllowed as exc:
                exchange.route = exc.route  # the route whose prefix matched
                response = problem_for(request, exc)
            except Exception as exc:
                response = problem_for(request, exc)
            status = response.status
            if not response.prepared:  # answered by the gateway: sent after this returns
                sent = response.content_length or 0
            return response
        finally:
            metrics.active -= 1
            sent = exchange.bytes_out or sent  # relayed body bytes, even if the client left
            received = request.content.total_bytes  # 0 for a request without a body
            finished(request, exchange, status, received, sent)
            if tracer is not None:
                tracer.record(request, exchange, status)

    return dispatch


Recorder = Callable[[Requested, Exchange, int, int, int], None]


def make_recorder(gateway: Gateway) -> Recorder:
    """What ends every answered request, the dispatcher's and the hit lane's
    (servers/hitlane.py) alike: its metrics and its access line, timed from the Exchange's
    start. Arguments: the request, its Exchange, status, body bytes received and sent."""
    access_log, metrics = gateway.access_log, gateway.metrics

    def finished(
        request: Requested, exchange: Exchange, status: int, received: int, sent: int
    ) -> None:
        seconds = time.perf_counter() - exchange.started
        metrics.observe(exchange, request.method, status, received, sent, seconds)
        access_log.record(request, exchange, status, received, sent, seconds)

    return finished


def enter(table: RouteTable, request: web.Request, exchange: Exchange) -> Route:
    """The request's facts (path, query, client) on its Exchange, and the route it matches
    in `table` (read once: an in-flight request keeps its table). 400, 404, 405, 505 raise."""
    if request.version[0] != 1:
        raise unsupported_version(request)
    raw = request.raw_path
    if not raw.startswith("/"):
        raw = origin_form(request)
    clients = table.clients
    if clients.trusted:
        exchange.client, exchange.forwarded_for = clients.resolve(request)
    else:  # no trusted proxy: the peer is the client, whatever X-Forwarded-For says
        exchange.client = request.remote or ""
    return locate(table, request.method, raw, exchange)


def locate(table: RouteTable, method: str, raw: str, exchange: Exchange) -> Route:
    """`enter`'s routing, for an origin-form target `raw`: path and query on the Exchange, and
    the route it matches (404 and 405 raise)."""
    path, query = target(raw)
    exchange.path = path
    exchange.query = query
    route = table.match(method, path)
    exchange.route = route.name
    exchange.service = route.service
    return route


def target(raw: str) -> tuple[str, str]:
    """An origin-form target's normalized path and its query string (with its "?", or "")."""
    path, mark, query = raw.partition("?")
    if "%" in path or "/." in path or "//" in path:  # else it is normalized already
        path = normalize_path(path)
    return path, mark + query


async def request_phase(chain: Chain, exchange: Exchange, request: web.Request) -> Answer:
    """The route's request-phase stages in order; the first answer ends it."""
    for stage in chain.request:
        answer = await stage.on_request(exchange, request)
        if answer is not None:
            return answer
    return None


def unsupported_version(request: web.Request) -> MalformedRequest:
    """HTTP/2.0 and later on this HTTP/1.1 port get 505 (RFC 9110 §15.6.6), as from nginx;
    a version-less request line (HTTP/0.9) is not answered in kind: 400."""
    if request.version[0] == 0:
        return MalformedRequest("HTTP/0.9 requests are not supported")
    return VersionNotSupported("this listener speaks HTTP/1.0 and HTTP/1.1")


def origin_form(request: web.Request) -> str:
    """The path and query of an absolute-form target (`GET http://host/a?b`, RFC 9112 §3.2.2;
    an empty path is "/"). CONNECT's authority-form names no path: the gateway is not a
    forward proxy."""
    if request.method == hdrs.METH_CONNECT:
        raise MalformedRequest("CONNECT is not supported: this is a gateway, not a proxy")
    raw = request.rel_url.raw_path_qs
    return raw if raw.startswith("/") else "/" + raw


ExpectHandler = Callable[[web.Request], Awaitable[None]]


def make_expect(gateway: Gateway) -> ExpectHandler:
    """`Expect: 100-continue` (RFC 9110 §10.1.1): invite the body only when the gateway will
    read it. The route's request phase runs here, before the invitation, so a request that
    will be refused for any reason (404, 405, 401, 413, 429...) or answered without its body
    (a preflight, a cache hit) gets that answer and never a 100 first. Dispatch goes on from
    what was found (`Exchange.prepared`)."""

    async def expect(request: web.Request) -> None:
        if request.version != HttpVersion11:
            return
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            return  # other expectations are ignored, as a proxy may (RFC 9110 §10.1.1)
        exchange = start_exchange(request)
        request[EXCHANGE] = exchange
        if gateway.tracer is not None:
            gateway.tracer.begin(exchange, request)
        route = None
        try:
            route = enter(gateway.table, request, exchange)
            chain = route.chain
            answer = await request_phase(chain, exchange, request) if chain.request else None
        except Exception as exc:  # not answered here: dispatch hands it to problem_for
            exchange.prepared = Prepared(route, None, exc)
            return
        exchange.prepared = Prepared(route, answer, None)
        if answer is None:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # what aiohttp's own handler does: no body sent yet

    return expect


class CatchAll(web.AbstractResource):
    """Every path and method to one handler. The RouteTable does the routing, so aiohttp's
    own URL matching (a regular expression per request) would be the same work done twice."""

    def __init__(self, handler: Handler, expect: ExpectHandler) -> None:
        super().__init__(name="gateway")
        self._route = web.ResourceRoute("*", handler, self, expect_handler=expect)

    @property
    def route(self) -> web.ResourceRoute:
        return self._route

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL("/")

    async def resolve(self, request: web.Request) -> tuple[web.UrlMappingMatchInfo, set[str]]:
        return web.UrlMappingMatchInfo({}, self._route), {"*"}

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("the gateway's catch-all is not mounted under a prefix")

    def get_info(self) -> _InfoDict:
        return {"path": "/"}

    def raw_match(self, path: str) -> bool:
        return True

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[web.AbstractRoute]:
        return iter((self._route,))


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application()  # no middlewares: see dispatch; parser limits: GatewayServer
    app[GATEWAY] = gateway
    dispatch, expect = make_dispatch(gateway), make_expect(gateway)
    catch_all = CatchAll(dispatch, expect)
    app.router.register_resource(catch_all)

    async def resolve(request: web.Request) -> web.UrlMappingMatchInfo:
        # Every request target to the one resource, with no walk over path prefixes (which
        # also left CONNECT and `GET http://host` to aiohttp's own plain-text 404).
        return (await catch_all.resolve(request))[0]

    app.router.resolve = resolve  # type: ignore[method-assign]  # see resolve's comment
    # What every request's match is: the catch-all, in this app. Frozen, so one serves all.
    match = web.UrlMappingMatchInfo({}, catch_all.route)
    match.add_app(app)
    match.freeze()

    async def handle(request: web.Request) -> web.StreamResponse:
        # Application._handle for an app with one resource and no middleware: the same steps
        # without the router's resolve and a new match per request (7 calls per request).
        request._match_info = match
        if request.headers.get(hdrs.EXPECT):
            await expect(request)  # it answers nothing itself: dispatch goes on from there
            await request.writer.drain()
        return await dispatch(request)

    app._handle = handle  # type: ignore[method-assign]  # what the app's server calls
    make_request = app._make_request

    def request_factory(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
        _cls: type[web.Request] = web.Request,
    ) -> web.Request:
        # aiohttp's request, with the cached properties every request reads filled in from
        # what it holds already (the values the properties would compute): each first read
        # of one would otherwise run a Python frame. An aiohttp whose properties no longer
        # cache there only ignores these.
        request = make_request(message, payload, protocol, writer, task, _cls)
        cache = request._cache
        cache["headers"] = message.headers
        cache["method"] = message.method
        cache["version"] = message.version
        cache["content"] = payload
        peer = request._transport_peername  # what the request took from its protocol
        if peer is not None:
            cache["remote"] = remote_text(peer)
        if "scheme" not in cache:  # an absolute-form target set it already
            cache["scheme"] = "https" if request._transport_sslcontext else "http"
        return request

    app._make_request = request_factory  # type: ignore[method-assign]  # ...and this
    app.on_response_prepare.append(apply_exchange)
    app.cleanup_ctx.append(_lifecycle)
    return app


def remote_text(peer: object) -> str:
    """`BaseRequest.remote` of a connection's peer name (not None)."""
    return str(peer[0]) if isinstance(peer, list | tuple) else str(peer)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start the access-log writer, metrics flush, health checks and file watch; stop them."""
    gateway = app[GATEWAY]
    gateway.access_log.start()
    gateway.health.sync(gateway.services.values())
    gateway.discovery.sync(gateway.services.values())
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(gateway.access_log.flush_forever(), name="access-log flush"),
        loop.create_task(gateway.metrics.flush_forever(), name="metrics flush"),
    ]
    if gateway.config_path is not None:
        gateway.reloader = Reloader(
            gateway.config_path, gateway.apply, served_hash=lambda: gateway.config.version_hash
        )
        tasks.append(loop.create_task(gateway.reloader.run(), name="config watch"))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await gateway.close()
    gateway.metrics.flush()
    await asyncio.to_thread(gateway.access_log.stop)  # joins the writer: never on the loop
