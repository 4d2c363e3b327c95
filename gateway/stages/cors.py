"""CORS per route (CONTRACT §8): the decisions in `CorsPolicy`, a thin stage around them.

On a CORS route the gateway owns the Access-Control-* headers: the upstream's are dropped,
and every answer (relayed, streamed or the gateway's own problem+json) carries `Vary: Origin`.

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) from an allowed origin
  is answered here, 204, and never forwarded, even when the route's methods lack OPTIONS.
  The answer lists what the route allows; the browser compares (as Envoy and Kong answer).
- Any other request from an allowed origin gets Access-Control-Allow-Origin (and -Credentials).
- An origin not listed gets no Access-Control-* header at all. Its preflight is not answered
  here: like Envoy's CORS filter, the gateway passes it on as a plain OPTIONS request, so it
  is forwarded when the route allows OPTIONS and is a 405 otherwise.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from multidict import istr

from gateway.config.model import CorsConfig, RouteConfig
from gateway.http.errors import MethodNotAllowed
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Answer, UpstreamResponse

ALLOW_ORIGIN: Final = hdrs.ACCESS_CONTROL_ALLOW_ORIGIN
ALLOW_CREDENTIALS: Final = hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS
ALLOW_METHODS: Final = hdrs.ACCESS_CONTROL_ALLOW_METHODS
ALLOW_HEADERS: Final = hdrs.ACCESS_CONTROL_ALLOW_HEADERS
MAX_AGE: Final = hdrs.ACCESS_CONTROL_MAX_AGE
REQUEST_METHOD: Final = hdrs.ACCESS_CONTROL_REQUEST_METHOD
REQUEST_HEADERS: Final = hdrs.ACCESS_CONTROL_REQUEST_HEADERS
# Every response header CORS defines (Fetch standard §3.2.3), and Chrome's private-network one.
ACCESS_CONTROL_HEADERS: Final = frozenset(
    {
        ALLOW_ORIGIN,
        ALLOW_CREDENTIALS,
        ALLOW_METHODS,
        ALLOW_HEADERS,
        MAX_AGE,
        hdrs.ACCESS_CONTROL_EXPOSE_HEADERS,
        istr("Access-Control-Allow-Private-Network"),
    }
)
VARY_ORIGIN: Final = ((hdrs.VARY, "Origin"),)

Headers = tuple[tuple[str, str], ...]


class CorsPolicy:
    """What a CORS route answers; every header tuple is built here, once per load."""

    __slots__ = ("_any", "_credentials", "_headers", "_methods", "_origins", "_tail")

    def __init__(self, config: CorsConfig) -> None:
        self._any = "*" in config.origins  # validate: never together with credentials
        self._credentials: Headers = ((ALLOW_CREDENTIALS, "true"),) if config.credentials else ()
        allowed = sorted(config.origins - {"*"})
        self._origins = {o: ((ALLOW_ORIGIN, o), *self._credentials, *VARY_ORIGIN) for o in allowed}
        self._methods = config.methods
        self._headers = config.headers
        max_age = () if config.max_age is None else ((MAX_AGE, str(config.max_age)),)
        self._tail: Headers = ((ALLOW_METHODS, config.methods), *max_age)

    def actual(self, origin: str | None) -> Headers:
        """The headers for any answer but a preflight's; only Vary for an origin not allowed."""
        if origin is None:
            return VARY_ORIGIN
        listed = self._origins.get(origin)
        if listed is not None:
            return listed
        return ((ALLOW_ORIGIN, "*"), *VARY_ORIGIN) if self._any else VARY_ORIGIN

    def preflight(self, origin: str, method: str, headers: str | None) -> Headers | None:
        """The 204's headers for a preflight from an allowed origin; None when not allowed.
        `method` and `headers` are what the browser asks for; it compares them with ours."""
        base = self.actual(origin)
        if base is VARY_ORIGIN:
            return None
        allowed = self._headers if self._headers is not None else headers
        asked = ((ALLOW_HEADERS, allowed),) if allowed else ()
        return (*base, *self._tail, *asked)


class CorsStage:
    """Request phase only: a preflight is answered here; every other answer of the route gets
    its CORS headers through the Exchange (streamed, relayed or problem+json alike)."""

    __slots__ = ("allow", "options_served", "policy", "route")

    def __init__(self, route: RouteConfig, config: CorsConfig) -> None:
        self.policy = CorsPolicy(config)
        self.options_served = hdrs.METH_OPTIONS in route.methods
        self.allow = ", ".join(sorted(route.methods))
        self.route = route.name

    async def on_request(self, exchange: Exchange, request: web.Request) -> Answer:
        if exchange.response_remove:
            exchange.response_remove |= ACCESS_CONTROL_HEADERS
        else:  # the usual case: no new set per request
            exchange.response_remove = ACCESS_CONTROL_HEADERS
        headers = request.headers
        origin = headers.get(hdrs.ORIGIN)
        if request.method == hdrs.METH_OPTIONS:
            asked = headers.get(REQUEST_METHOD)
            if origin is not None and asked is not None:
                answer = self.policy.preflight(origin, asked, headers.get(REQUEST_HEADERS))
                if answer is not None:
                    exchange.response_headers += answer
                    return UpstreamResponse(204, [])
            if not self.options_served:  # routed here only for preflights (routing.py)
                exchange.response_headers += VARY_ORIGIN
                raise self._refusal()
        exchange.response_headers += self.policy.actual(origin)
        return None

    def _refusal(self) -> MethodNotAllowed:
        error = MethodNotAllowed(
            f"OPTIONS is not allowed here; allowed: {self.allow}", headers={"Allow": self.allow}
        )
        error.route = self.route
        return error


def cors_stage(route: RouteConfig) -> CorsStage | None:
    return None if route.cors is None else CorsStage(route, route.cors)
