"""Upstreams for failure tests: a target whose behaviour a test flips while it runs (answer,
503, reset, hang; healthy or not) and which counts what reached it, plus small helpers to
drive many requests and to wait for a condition with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer

from gateway.runtime.state import GATEWAY, Gateway

Mode = Literal["ok", "fail", "reset", "hang"]
T = TypeVar("T")


class Target:
    """One upstream's behaviour and what it saw; `app()` builds a fresh app sharing both, so
    a test can stop the server and start another on the same port ("the target restarts")."""

    def __init__(self, name: str, mode: Mode = "ok") -> None:
        self.name = name
        self.mode: Mode = mode
        self.health_status = 200  # what GET /healthz answers
        self.hits: Counter[str] = Counter()  # requests that reached a handler, by method
        self.bodies: list[int] = []  # body length of each request, in arrival order
        self.probes = 0  # GET /healthz requests
        self.delayed = 0  # GET /delay/{ms} requests
        self.release = asyncio.Event()  # a "hang" request answers once this is set

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/delay/{ms:[0-9]+}", self._delay)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.Response(status=self.health_status, text=self.name)

    async def _delay(self, request: web.Request) -> web.Response:
        """Answers after the given milliseconds (for timeouts), whatever the mode."""
        self.delayed += 1
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.json_response({"target": self.name})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.method] += 1
        self.bodies.append(len(await request.read()))
        if self.mode == "fail":
            return web.Response(status=503, text="overloaded")
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.mode == "hang":
            await self.release.wait()
        return web.json_response({"target": self.name, "method": request.method})


async def serve(aiohttp_server: AiohttpServer, *targets: Target) -> list[str]:
    """Start a loopback server for each target; their base URLs, in order."""
    return [str((await aiohttp_server(t.app())).make_url("")).rstrip("/") for t in targets]


async def in_batches(calls: Iterable[Callable[[], Awaitable[T]]], size: int = 20) -> list[T]:
    """Run the calls `size` at a time (so a test drives steady concurrent load)."""
    pending = list(calls)
    results: list[T] = []
    for start in range(0, len(pending), size):
        results.extend(await asyncio.gather(*(c() for c in pending[start : start + size])))
    return results


def one_service(targets: str = "[$A, $B]", **settings: str) -> str:
    """routes.yaml text: service `svc` with these targets and settings, behind `/svc`."""
    lines = "".join(f"    {key}: {value}\n" for key, value in settings.items())
    return (
        "version: 1\nservices:\n  svc:\n"
        f"    targets: {targets}\n{lines}"
        "routes:\n  - {prefix: /svc, service: svc, strip_prefix: true}\n"
    )


def gateway_of(client: TestClient[web.Request, web.Application]) -> Gateway:
    app = client.app
    assert app is not None
    return app[GATEWAY]


async def status(
    client: TestClient[web.Request, web.Application], method: str, path: str, data: object = None
) -> int:
    """Send one request through the gateway, read the whole answer, return its status."""
    async with client.request(method, path, data=data) as response:
        await response.read()
        return response.status
