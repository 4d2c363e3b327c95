"""The hit lane: a fresh cache hit answered from the connection's data_received, as nginx
answers from its cache in the event handler.

A request that aiohttp's connection loop handles costs a Task, a request object, a response
and its writer before the dispatcher (servers/public.py) runs; on a cache hit that is most of
the CPU it takes. When the connection is idle and a parsed request is one the lane can answer,
`GatewayProtocol.data_received` (servers/connection.py) asks `HitLane.answer` for its bytes
and writes them itself; anything else goes to aiohttp's loop as before, in order.

The lane answers only where everything the dispatcher would do before the cache lookup is
known to do nothing for this request, and then through the same functions:

- tracing off (`gateway.tracer` None), the public application's own response hook alone
  (`lane_ready`), no trusted proxy (the peer is the client);
- a GET or HEAD of HTTP/1.0 or 1.1, origin-form target, no body, no `Expect`, no upgrade;
- the route the table matches (as the dispatcher's `enter` does) has a `Lane`: its request phase is
  the cache stage, after stages whose work on a body-less request is synchronous (body limit,
  header rules: runtime/assemble.py `lane_of`);
- the cache stage's `lane_hit` has an unconditional fresh hit in memory that its `Wire`
  encodes (so the bytes are those of the dispatcher's encoded hit).

The Exchange comes from `exchange_for` (X-Request-ID and traceparent as always), and the
metrics and access line from `make_recorder`, as the dispatcher's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_parser import RawRequestMessage

from gateway.http.errors import MethodNotAllowed, RouteNotFound
from gateway.http.exchange import apply_exchange, exchange_for
from gateway.servers.public import make_recorder, target

if TYPE_CHECKING:
    from gateway.runtime.state import Gateway

LANE_METHODS: Final = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})
LANE_VERSIONS: Final = frozenset({HttpVersion10, HttpVersion11})


class Seen(NamedTuple):
    """What the access line reads of a request answered in the lane (accesslog.Requested)."""

    method: str
    remote: str


class HitLane:
    """The lane of one public listener's connections (`GatewayServer.lane`)."""

    __slots__ = ("_finished", "_gateway", "answered")

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._finished = make_recorder(gateway)
        self.answered = 0  # requests answered here (tests and benchmarks read it)

    def answer(self, message: RawRequestMessage, remote: str) -> bytes | None:
        """The answer to a parsed request without a body from the peer `remote`, counted and
        logged; None: the normal path answers it (nothing of it was recorded). The connection
        goes on after it unless `message.should_close`."""
        gateway = self._gateway
        method, raw, table = message.method, message.path, gateway.table
        if not table.lanes or method not in LANE_METHODS:  # the table's, set as it is built
            return None
        headers = message.headers
        if (
            gateway.tracer is not None
            or message.version not in LANE_VERSIONS
            or message.upgrade
            or hdrs.EXPECT in headers
            or not raw.startswith("/")
        ):
            return None
        # `locate`'s routing, with the Exchange made only for a lane's route
        path, query = target(raw)
        try:
            route = table.match(method, path)
        except (RouteNotFound, MethodNotAllowed):  # the dispatcher's 404 or 405
            return None
        lane = route.chain.lane
        if lane is None:
            return None
        exchange = exchange_for(headers)  # what `enter` puts on it, for this request
        exchange.client = remote
        exchange.path, exchange.query = path, query
        exchange.route, exchange.service = route.name, route.service
        for step in lane.steps:
            step(exchange)
        hit = lane.cache.lane_hit(
            exchange, method, headers, message.version, not message.should_close
        )
        if hit is None:
            return None
        self._finished(Seen(method, remote), exchange, hit.status, 0, hit.length)
        self.answered += 1
        return hit.wire


def lane_ready(app: web.Application) -> bool:
    """Whether the lane may answer for `app`: the public app, whose responses are prepared by
    `apply_exchange` alone (what the encoded hit stands in for) and no middleware."""
    handlers = app.on_response_prepare
    return (
        not app.middlewares
        and not app._subapps
        and len(handlers) == 1
        and handlers[0] is apply_exchange
    )
