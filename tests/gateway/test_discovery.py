"""DNS service discovery: a service follows its name from one address to another while traffic
flows (127.0.0.2 -> 127.0.0.3, one upstream on each), a failed resolution keeps the last set,
and an address that disappears is drained: its request in flight finishes, no new one comes.
The resolver is one the test steers (`Gateway.discovery.resolver`)."""

from __future__ import annotations

import asyncio
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.runtime.state import Gateway
from gateway.servers.admin import create_admin_app
from gateway.upstream.discovery import ServiceDiscovery
from tests.gateway.conftest import GatewayClient, GatewayTestServer
from tests.polling import eventually

ROUTES = """
version: 1
services:
  backend:
    targets: [http://backend.test:$PORT]
    discovery: {dns: {interval: 50ms}}
routes:
  - prefix: /
    service: backend
"""


class SteeredResolver:
    """Answers what the test says: a list of addresses, or an error."""

    def __init__(self, answer: list[str]) -> None:
        self.answer: list[str] | OSError = answer
        self.calls = 0
        self.asked: set[tuple[str, int]] = set()

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls += 1
        self.asked.add((host, port))
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


def make_named_app(name: str, gate: asyncio.Event) -> web.Application:
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"server": name, "host": request.host})

    async def held(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"server": name})

    app = web.Application()
    app.router.add_get("/held", held)
    app.router.add_get("/{tail:.*}", whoami)
    return app


class Upstreams:
    def __init__(self, a: TestServer, b: TestServer, gate: asyncio.Event) -> None:
        self.a, self.b, self.gate = a, b, gate
        assert a.port is not None
        self.port: int = a.port


@pytest.fixture
async def upstreams(aiohttp_server: AiohttpServer) -> Upstreams:
    """Server "a" on 127.0.0.2 and "b" on 127.0.0.3, on the same port (as pods are)."""
    gate = asyncio.Event()
    a = await aiohttp_server(make_named_app("a", gate), host="127.0.0.2")
    b = await aiohttp_server(make_named_app("b", gate), host="127.0.0.3", port=a.port)
    return Upstreams(a, b, gate)


async def start(
    aiohttp_client: AiohttpClient, upstreams: Upstreams, resolver: SteeredResolver
) -> tuple[GatewayClient, Gateway]:
    result = load_text(ROUTES.replace("$PORT", str(upstreams.port)), "routes.yaml", environ={})
    assert result.config is not None, [str(e) for e in result.errors]
    gateway = Gateway(result.config)
    gateway.discovery.resolver = resolver  # before the app starts its refresher
    client = cast(GatewayClient, await aiohttp_client(GatewayTestServer(gateway)))
    return client, gateway


def labels(gateway: Gateway) -> list[str]:
    return [t.label for t in gateway.services["backend"].targets]


def urls(gateway: Gateway) -> list[str]:
    return [t.url for t in gateway.services["backend"].targets]


async def whoami(client: GatewayClient, path: str = "/who") -> tuple[int, str]:
    async with client.get(path) as resp:
        if resp.status != 200:
            return resp.status, ""
        body = await resp.json()
        return resp.status, str(body["server"])


class Traffic:
    """Requests in a loop from a few tasks until stopped; every status and server is kept."""

    def __init__(self, client: GatewayClient) -> None:
        self.client = client
        self.seen: list[tuple[int, str]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(4)]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(await whoami(self.client))
            except aiohttp.ClientError:
                self.seen.append((0, ""))

    def servers_since(self, mark: int) -> set[str]:
        return {server for _, server in self.seen[mark:]}

    async def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.seen


async def test_a_service_moves_from_one_address_to_another_under_traffic_with_no_5xx(
    aiohttp_client: AiohttpClient, upstreams: Upstreams
) -> None:
    resolver = SteeredResolver(["127.0.0.2"])
    client, gateway = await start(aiohttp_client, upstreams, resolver)
    await eventually(lambda: labels(gateway) == ["backend#0.1"], within=5)
    traffic = Traffic(client)
    try:
        await eventually(lambda: traffic.servers_since(0) == {"a"}, within=5)
        resolver.answer = ["127.0.0.3", "127.0.0.2"]  # scaled up: both take traffic
        await eventually(lambda: labels(gateway) == ["backend#0.1", "backend#0.2"], within=5)
        mark = len(traffic.seen)
        await eventually(lambda: traffic.servers_since(mark) == {"a", "b"}, within=5)
        resolver.answer = ["127.0.0.3"]  # "a" is gone from DNS: drained, then shut down
        await eventually(lambda: labels(gateway) == ["backend#0.2"], within=5)
        mark = len(traffic.seen)
        await eventually(lambda: len(traffic.seen) > mark + 20, within=5)
        await upstreams.a.close()  # nothing goes there any more: closing it costs no request
        mark = len(traffic.seen)
        await eventually(lambda: len(traffic.seen) > mark + 50, within=5)
        after_close = traffic.servers_since(mark)
    finally:
        seen = await traffic.stop()

    statuses = {status for status, _ in seen}
    assert statuses == {200}, statuses
    assert after_close == {"b"}
    assert resolver.asked == {("backend.test", upstreams.port)}


async def test_the_host_header_and_labels_name_the_host_never_the_address(
    aiohttp_client: AiohttpClient, upstreams: Upstreams
) -> None:
    resolver = SteeredResolver(["127.0.0.2"])
    client, gateway = await start(aiohttp_client, upstreams, resolver)
    await eventually(lambda: labels(gateway) == ["backend#0.1"], within=5)
    async with client.get("/who") as resp:
        body = await resp.json()
    admin = await aiohttp_client(create_admin_app(gateway))
    async with admin.get("/routes") as resp:
        admin_text = await resp.text()

    assert body == {"server": "a", "host": f"backend.test:{upstreams.port}"}
    assert urls(gateway) == [f"http://127.0.0.2:{upstreams.port}"]
    assert "backend#0.1" in admin_text
    assert "127.0.0.2" not in admin_text


async def test_a_failed_resolution_keeps_the_last_good_set(
    aiohttp_client: AiohttpClient, upstreams: Upstreams
) -> None:
    resolver = SteeredResolver(["127.0.0.2", "127.0.0.3"])
    client, gateway = await start(aiohttp_client, upstreams, resolver)
    await eventually(lambda: len(labels(gateway)) == 2, within=5)
    before = list(gateway.services["backend"].targets)
    resolver.answer = OSError("Temporary failure in name resolution")
    calls = resolver.calls
    await eventually(lambda: resolver.calls >= calls + 3, within=5)
    codes = [(await whoami(client))[0] for _ in range(10)]
    resolver.answer = []  # an empty answer is no answer either
    calls = resolver.calls
    await eventually(lambda: resolver.calls >= calls + 3, within=5)
    after = list(gateway.services["backend"].targets)

    assert after == before  # the very same targets: their state is kept
    assert codes == [200] * 10


async def test_an_address_that_disappears_finishes_its_request_in_flight_and_gets_no_new_one(
    aiohttp_client: AiohttpClient, upstreams: Upstreams
) -> None:
    resolver = SteeredResolver(["127.0.0.2"])
    client, gateway = await start(aiohttp_client, upstreams, resolver)
    await eventually(lambda: labels(gateway) == ["backend#0.1"], within=5)
    held = asyncio.create_task(whoami(client, "/held"))  # in flight on "a"
    service = gateway.services["backend"]
    await eventually(lambda: service.targets[0].in_flight == 1, within=5)
    drained = service.targets[0]
    resolver.answer = ["127.0.0.3"]
    await eventually(lambda: labels(gateway) == ["backend#0.2"], within=5)
    new = [await whoami(client) for _ in range(5)]
    busy_while_held = service.busy
    upstreams.gate.set()
    finished = await asyncio.wait_for(held, 5)

    assert finished == (200, "a")
    assert new == [(200, "b")] * 5
    assert busy_while_held  # a reload would keep the pool open for it
    assert drained.in_flight == 0
    assert not service.busy


async def test_a_reload_keeps_the_discovered_addresses_and_their_state(
    aiohttp_client: AiohttpClient, upstreams: Upstreams
) -> None:
    resolver = SteeredResolver(["127.0.0.2", "127.0.0.3"])
    client, gateway = await start(aiohttp_client, upstreams, resolver)
    await eventually(lambda: len(labels(gateway)) == 2, within=5)
    old = gateway.services["backend"]
    breakers = [t.breaker for t in old.targets]
    text = ROUTES.replace("$PORT", str(upstreams.port)).replace("50ms", "60ms")
    result = load_text(text, "routes.yaml", environ={})
    resolver.answer = OSError("down")  # the new service cannot resolve: it adopted the set
    assert gateway.apply(result)
    new = gateway.services["backend"]
    adopted = labels(gateway)
    codes = [(await whoami(client))[0] for _ in range(4)]

    assert new is not old
    assert adopted == ["backend#0.1", "backend#0.2"]
    assert [t.breaker for t in new.targets] == breakers
    assert codes == [200] * 4


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (["127.0.0.2"], ["backend#0.1"]),
        (["127.0.0.2", "127.0.0.2"], ["backend#0.1"]),
        (["127.0.0.3", "127.0.0.2"], ["backend#0.1", "backend#0.2"]),
    ],
    ids=["one address", "duplicates are one target", "sorted by address"],
)
async def test_each_distinct_address_is_one_target(
    aiohttp_client: AiohttpClient,
    upstreams: Upstreams,
    answer: list[str],
    expected: list[str],
) -> None:
    resolver = SteeredResolver(answer)
    _, gateway = await start(aiohttp_client, upstreams, resolver)
    found = gateway.discovery.of("backend")
    assert isinstance(found, ServiceDiscovery)
    await found.refresh()

    assert labels(gateway) == expected
