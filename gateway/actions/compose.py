"""The `compose` action: a Python handler answers the route, calling services through the
gateway's own upstream stack (CONTRACT §11).

A handler is a plain async function, imported when the config was loaded:

    async def handler(ctx: Context, request: ComposeRequest) -> UpstreamResponse | web.Response

`ctx.call(service, method, path, json=, headers=, idempotency_key=)` sends one request
(kind "call") with the identity headers and request id of a forwarded request, within the
route's deadline (`ctx.deadline`), and returns a `CallResult` (`status`, `headers`, `json`).
Retries follow the service's settings, for idempotent methods only, or for a call that
carries an idempotency key (sent as `Idempotency-Key`). Every call is a step in `ctx.steps`:

    {"service": "payments", "method": "POST", "path": "/payments", "status": 201,
     "state": "applied" | "failed" | "compensated" | "compensation_failed"}

`applied` is an answer below 400; `failed` is 4xx/5xx or no answer. `ctx.on_failure(c)`
registers a compensation (a coroutine, or an async function of no arguments) for the step
just made. When the handler raises (its own exception, `ctx.fail(...)`, or a `CallFailed`
from a call it did not handle), the compensations run newest first, and the answer is a
problem+json whose `steps` member lists every step's final state. A handler's own exception
is a 500 without its traceback, which is logged once on `gateway.compose`.
"""

from __future__ import annotations

import asyncio
import inspect
import json as jsonlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, NoReturn

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, MultiMapping

from gateway.actions.calls import BodyTooLarge, Fetched, call_headers, fetch
from gateway.config.model import DEFAULT_MAX_PART_BYTES, ComposeAction, RouteConfig
from gateway.http.errors import (
    BadRequest,
    CallFailed,
    CallTimedOut,
    GatewayError,
    HandlerFailed,
    HandlerRefused,
    PayloadTooLarge,
    UpstreamTimeout,
)
from gateway.http.exchange import Exchange
from gateway.http.pipeline import Action, UpstreamResponse
from gateway.http.routing import strip
from gateway.upstream.service import Headers, Service

logger = logging.getLogger("gateway.compose")

JSON_TYPE: Final = "application/json"
Compensation = Coroutine[Any, Any, object] | Callable[[], Awaitable[object]]
Step = dict[str, object]


@dataclass(frozen=True, slots=True)
class CallResult:
    """What `ctx.call` returns: the service's status, headers and parsed JSON (None when the
    body was empty or not JSON; the raw bytes are `body`)."""

    status: int
    headers: CIMultiDictProxy[str]
    json: Any
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ComposeRequest:
    """The client's request as a handler sees it: `method`, `path` (after the route's
    prefix), `query`, `headers`, and `await read()` / `await json()` for the body (at most the
    route's body limit, or 1 MiB)."""

    __slots__ = ("_body", "_exchange", "_limit", "_request", "headers", "method", "path", "query")

    def __init__(self, request: web.Request, exchange: Exchange, path: str, limit: int) -> None:
        self.method = request.method
        self.path = path
        self.query: MultiMapping[str] = request.query
        self.headers: CIMultiDictProxy[str] = request.headers
        self._request, self._exchange, self._limit = request, exchange, limit
        self._body: bytes | None = None

    async def read(self) -> bytes:
        if self._body is None:
            source = self._exchange.body
            if source is None and self._request.body_exists:
                source = self._request.content.iter_any()
            chunks, seen = [], 0
            async for chunk in source if source is not None else _nothing():
                seen += len(chunk)
                if seen > self._limit:
                    raise PayloadTooLarge(f"the request body is larger than {self._limit} bytes")
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        """The body as JSON; 400 when it is not."""
        try:
            return jsonlib.loads(await self.read())
        except ValueError as exc:
            raise BadRequest("the request body is not valid JSON") from exc


class Context:
    """One request's handle on the gateway: `call`, `json`, `fail`, `on_failure`, and the
    facts `consumer`, `request_id`, `deadline` (event-loop time by which the route must
    answer, None without `timeouts.total`) and `steps`."""

    def __init__(
        self,
        services: Mapping[str, Service],
        headers: Headers,
        exchange: Exchange,
        deadline: float | None,
        limit: int,
    ) -> None:
        self.consumer = exchange.consumer
        self.request_id = exchange.request_id
        self.deadline = deadline
        self.steps: list[Step] = []
        self._services, self._headers, self._exchange, self._limit = (
            services,
            headers,
            exchange,
            limit,
        )
        self._compensations: list[tuple[Step | None, Compensation]] = []
        self._compensating = False

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return max(self.deadline - asyncio.get_running_loop().time(), 0.0)

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> CallResult:
        """One request to `service`; raises CallFailed (502) or CallTimedOut (504) when no
        answer came. Any status is returned, 4xx and 5xx included."""
        target = self._services.get(service)
        if target is None:
            raise LookupError(f"no service named {service!r} in this config")
        if not path.startswith("/"):
            raise ValueError(f"a call's path must start with '/', got {path[:40]!r}")
        method = method.upper()
        out = list(self._headers)
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            out.append((hdrs.CONTENT_TYPE, JSON_TYPE))
        if headers:
            own = {name.lower() for name in headers}
            out = [item for item in out if item[0].lower() not in own]
            out += headers.items()
        if idempotency_key is not None:
            out.append(("Idempotency-Key", idempotency_key))
        step: Step = {"service": service, "method": method, "path": path.partition("?")[0]}
        if not self._compensating:
            self.steps.append(step)
        try:
            # A compensation is not cut short by the deadline that failed the request: its
            # calls are bounded by the service's own timeouts.
            seconds = None if self._compensating else self.remaining()
            got = await fetch(target, method, path, out, body, seconds, self._limit, "call")
        except GatewayError as error:
            if error.call is not None:
                self._exchange.calls += (error.call,)
            step.update(status=None, state="failed")
            if isinstance(error, BodyTooLarge):
                raise CallFailed(f"service {service!r}: {error.detail}") from error
            failed = CallTimedOut if isinstance(error, UpstreamTimeout) else CallFailed
            raise failed(error.detail) from error
        self._exchange.calls += (got.call,)
        step.update(status=got.status, state="applied" if got.status < 400 else "failed")
        return CallResult(got.status, got.headers, _parse(got), got.body)

    def json(
        self, status: int, body: object, headers: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        """An answer of `body` as JSON with `status`."""
        out: Headers = [(hdrs.CONTENT_TYPE, JSON_TYPE)]
        if headers:
            out += headers.items()
        return UpstreamResponse(status, out, jsonlib.dumps(body).encode())

    def fail(self, status: int, detail: str, **members: object) -> NoReturn:
        """End the request with `status` (problem+json with `detail`, `steps` and `members`)
        after running the compensations registered so far."""
        error = HandlerRefused(status, detail, _title(status))
        error.members = members
        raise error

    def on_failure(self, compensation: Compensation) -> None:
        """Undo the step just made if a later one fails (compensations run newest first)."""
        self._compensations.append((self.steps[-1] if self.steps else None, compensation))

    async def compensate(self) -> None:
        """Run the compensations newest first; one that fails is logged, the rest still run."""
        self._compensating = True
        while self._compensations:
            step, compensation = self._compensations.pop()
            try:
                if inspect.iscoroutine(compensation):
                    await compensation
                else:
                    assert callable(compensation)
                    await compensation()
            except Exception as exc:  # a compensation's own failure: reported, not raised
                logger.warning("compensation for %s failed: %r", step, exc)
                if step is not None:
                    step["state"] = "compensation_failed"
                continue
            if step is not None:
                step["state"] = "compensated"

    def discard(self) -> None:
        """Success: the compensations are not needed (coroutines are closed unawaited)."""
        for _, compensation in self._compensations:
            if inspect.iscoroutine(compensation):
                compensation.close()
        self._compensations.clear()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


def _parse(got: Fetched) -> Any:
    if not got.body:
        return None
    try:
        return jsonlib.loads(got.body)
    except ValueError:
        return None


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


Handler = Callable[[Context, ComposeRequest], Awaitable[object]]


def compose_action(
    route: RouteConfig, action: ComposeAction, services: Mapping[str, Service]
) -> Action:
    handler: Handler | None = action.function
    assert handler is not None  # imported when the config was loaded
    spec, prefix = action.handler, route.prefix
    deadline = route.timeouts.total
    limit = route.max_part_bytes
    body_limit = route.max_body_bytes or DEFAULT_MAX_PART_BYTES

    async def compose(request: web.Request, exchange: Exchange) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        ends = None if deadline is None else loop.time() + deadline
        ctx = Context(services, call_headers(request, exchange, route), exchange, ends, limit)
        incoming = ComposeRequest(request, exchange, strip(prefix, exchange.path), body_limit)
        try:
            async with asyncio.timeout_at(ends):
                answer = await handler(ctx, incoming)
        except GatewayError as error:  # ctx.fail, an unhandled CallFailed, a bad body
            await ctx.compensate()
            if ctx.steps:
                error.members = {**error.members, "steps": ctx.steps}
            raise
        except TimeoutError as exc:
            for step in ctx.steps:  # a call the deadline cut short got no answer: it failed
                if "state" not in step:
                    step.update(status=None, state="failed")
            await ctx.compensate()
            late = CallTimedOut(f"the compose handler did not answer within {deadline} s")
            late.members = {"steps": ctx.steps}
            raise late from exc
        except Exception as exc:
            logger.error("compose handler %s raised", spec, exc_info=exc)
            await ctx.compensate()
            failed = HandlerFailed("the compose handler failed")
            failed.members = {"steps": ctx.steps}
            raise failed from None
        except BaseException:  # cancelled (the client left): nothing more is sent
            ctx.discard()
            raise
        ctx.discard()
        return _response(answer, spec)

    return compose


def _response(answer: object, spec: str) -> UpstreamResponse:
    if isinstance(answer, UpstreamResponse):
        return answer
    if isinstance(answer, web.Response) and isinstance(answer.body, bytes | None):
        headers = [(k, v) for k, v in answer.headers.items() if k.lower() != "content-length"]
        return UpstreamResponse(answer.status, headers, answer.body or b"", reason=answer.reason)
    logger.error("compose handler %s returned %s, not a response", spec, type(answer).__name__)
    raise HandlerFailed("the compose handler failed")
