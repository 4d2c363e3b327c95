"""Fixtures for gateway tests: real upstream servers on loopback and a gateway built from
routes.yaml text in which $ECHO and $TOOLS stand for those upstreams' URLs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blockbuster import BlockBuster, blockbuster_ctx
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.config.validate import schema_validator
from gateway.runtime.state import Gateway
from gateway.servers.connection import GatewayRunner
from gateway.servers.public import create_app
from tests.upstreams import make_echo_app, make_tools_app

GatewayClient = TestClient[web.Request, web.Application]
schema_validator()  # read the schema file now: tests compile configs on the event loop


@pytest.fixture(autouse=True)
def no_blocking_in_loop() -> Iterator[BlockBuster]:
    """Every gateway test runs under `blockbuster`: a file, socket, lock or sleep call made on
    the event loop's thread raises. Logs, config reads and metrics files are written and read
    by other threads, so nothing in the gateway should trip it."""
    with blockbuster_ctx() as blockbuster:
        yield blockbuster


MakeGateway = Callable[..., Awaitable[GatewayClient]]


class GatewayTestServer(TestServer):
    """A test server whose connections are the gateway's own (`GatewayRunner`): its client
    limits and parser answers apply, as in production."""

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(create_app(gateway), **kwargs)
        self.gateway = gateway

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, self.gateway, **kwargs)


@pytest.fixture
async def echo_upstream(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_echo_app())


@pytest.fixture
async def tools_upstream(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_tools_app(slow_delay=5.0))


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def compile_gateway(routes: str, **upstreams: TestServer) -> Gateway:
    for name, server in upstreams.items():
        routes = routes.replace(f"${name.upper()}", base_url(server))
    result = load_text(routes, "routes.yaml", environ={})
    assert result.config is not None, [str(e) for e in result.errors]
    return Gateway(result.config)


@pytest.fixture
def make_gateway(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer, tools_upstream: TestServer
) -> MakeGateway:
    """`await make_gateway(yaml_text, **more_upstreams)` -> a test client of the gateway."""

    async def make(routes: str, **upstreams: TestServer) -> GatewayClient:
        gateway = compile_gateway(routes, echo=echo_upstream, tools=tools_upstream, **upstreams)
        client: object = await aiohttp_client(GatewayTestServer(gateway))
        return cast(GatewayClient, client)  # typed for a bare server; it serves the app

    return make


ECHO_ROUTE = """
version: 1
services:
  echo: {targets: [$ECHO]}
  tools: {targets: [$TOOLS], timeouts: {read: 1s}}
routes:
  - prefix: /api/inventory
    service: echo
    strip_prefix: true
  - prefix: /echo
    service: echo
  - prefix: /tools
    service: tools
    strip_prefix: true
"""
