"""The `aggregate` action: fan out to several services at once and answer one JSON object
keyed by part name (CONTRACT §11).

Parts run concurrently, each as its own upstream call (kind "part") through `Service.send`,
bounded by its own `timeout` and what is left of the route's deadline (`timeouts.total`). A
part fails when it cannot be reached or times out, answers other than 2xx, answers something
that is not JSON, or answers more than `max_part_bytes`. A failed optional part is `null` and
named in the body's `partial` list and in `X-Partial`; a failed required part ends the
request at once (the other parts are cancelled) with a 502, or 504 on a timeout, naming the
part and its service, never an address. The client's body is never sent to a part.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web

from gateway.actions.calls import BodyTooLarge, call_headers, fetch
from gateway.config.model import AggregateAction, AggregatePart, RouteConfig
from gateway.config.templates import PathTemplate, parse_template
from gateway.http.errors import GatewayError, PartFailed, PartTimedOut, UpstreamTimeout
from gateway.http.exchange import Exchange, UpstreamCall
from gateway.http.pipeline import Action, UpstreamResponse
from gateway.upstream.service import Headers, Service

X_PARTIAL: Final = "X-Partial"
JSON_TYPE: Final = "application/json"
_NO_QUERY: Final[Mapping[str, str]] = {}


@dataclass(frozen=True, slots=True)
class Part:
    """A part as it runs: its config, service and parsed path, decided at assemble time."""

    name: str
    config: AggregatePart
    service: Service
    path: PathTemplate


class _Failed(Exception):
    """A part that did not give JSON: why (a detail naming the part), and whether it was a
    timeout (504) rather than another failure (502)."""

    def __init__(self, detail: str, timeout: bool) -> None:
        super().__init__(detail)
        self.detail, self.timeout = detail, timeout


def aggregate_action(
    route: RouteConfig, action: AggregateAction, services: Mapping[str, Service]
) -> Action:
    parts = []
    for name, config in action.parts:
        template = parse_template(config.path)
        assert isinstance(template, PathTemplate)  # validated
        parts.append(Part(name, config, services[config.service], template))
    needs_query = any(kind == "query" for p in parts for kind, _ in p.path.pieces)
    deadline = route.timeouts.total  # seconds for the whole answer; None: parts' own bounds
    limit, prefix = route.max_part_bytes, route.prefix

    async def aggregate(request: web.Request, exchange: Exchange) -> UpstreamResponse:
        headers = call_headers(request, exchange, route)
        rest = _rest(prefix, exchange.path)
        query = request.query if needs_query else _NO_QUERY
        loop = asyncio.get_running_loop()
        ends = None if deadline is None else loop.time() + deadline
        tasks = [
            loop.create_task(_run(part, part.path.render(rest, query), headers, ends, limit))
            for part in parts
        ]
        try:
            await _until_required_fails(tasks, parts)
        finally:
            for task in tasks:
                task.cancel()  # a required part failed (or the client left): stop the rest
            await asyncio.gather(*tasks, return_exceptions=True)
            exchange.calls += tuple(
                _record(part, task) for part, task in zip(parts, tasks, strict=True)
            )
        outcomes = [
            (part, task.result())
            for part, task in zip(parts, tasks, strict=True)
            if task.done() and not task.cancelled()
        ]
        for part, (_, failure, _) in outcomes:
            if failure is not None and part.config.required:
                raise (PartTimedOut if failure.timeout else PartFailed)(failure.detail)
        body: dict[str, object] = {}
        partial = []
        for part, (value, failure, _) in outcomes:
            body[part.name] = value
            if failure is not None:
                partial.append(part.name)
        body["partial"] = partial
        out: Headers = [(hdrs.CONTENT_TYPE, JSON_TYPE)]
        if partial:
            out.append((X_PARTIAL, ", ".join(partial)))
        return UpstreamResponse(200, out, json.dumps(body).encode())

    return aggregate


Outcome = tuple[object, "_Failed | None", "UpstreamCall | None"]


async def _until_required_fails(tasks: list[asyncio.Task[Outcome]], parts: list[Part]) -> None:
    """Wait for every part, or only until a required one has failed."""
    pending: set[asyncio.Task[Outcome]] = set(tasks)
    required = {task for task, part in zip(tasks, parts, strict=True) if part.config.required}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if any(task in required and task.result()[1] is not None for task in done):
            return


def _record(part: Part, task: asyncio.Task[Outcome]) -> UpstreamCall:
    if task.cancelled():  # a required part failed first: this one's call was abandoned
        return UpstreamCall(part.service.name, "part", outcome="cancelled")
    call = task.result()[2]
    return call if call is not None else UpstreamCall(part.service.name, "part", outcome="error")


async def _run(
    part: Part, path_qs: str, headers: Headers, ends: float | None, limit: int
) -> Outcome:
    """(the part's JSON or None, its failure or None, its call record); never raises but
    CancelledError."""
    seconds = part.config.timeout
    if ends is not None:
        left = ends - asyncio.get_running_loop().time()
        seconds = left if seconds is None else min(seconds, left)
    name, service = part.name, part.service.name
    try:
        got = await fetch(
            part.service, part.config.method, path_qs, headers, None, seconds, limit, "part"
        )
    except BodyTooLarge as error:
        return (
            None,
            _Failed(f"part {name!r}: service {service!r}: {error.detail}", False),
            error.call,
        )
    except GatewayError as error:
        failure = _Failed(f"part {name!r}: {error.detail}", isinstance(error, UpstreamTimeout))
        return None, failure, error.call
    if not 200 <= got.status < 300:
        return (
            None,
            _Failed(f"part {name!r}: service {service!r} answered {got.status}", False),
            got.call,
        )
    kind = got.headers.get(hdrs.CONTENT_TYPE, JSON_TYPE).partition(";")[0].strip().lower()
    try:
        if not (kind.endswith("/json") or kind.endswith("+json")):
            raise ValueError(kind)
        value: object = json.loads(got.body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        got.call.outcome = "not_json"
        return (
            None,
            _Failed(f"part {name!r}: service {service!r} did not answer JSON", False),
            got.call,
        )
    return value, None, got.call


def _rest(prefix: str, path: str) -> str:
    """'/api/home/7' on prefix '/api/home' -> '7' (CONTRACT §11)."""
    rest = path if prefix == "/" else path[len(prefix) :]
    return rest.lstrip("/")
