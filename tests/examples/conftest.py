"""Fixtures for the shipped examples: a gateway built from the example's own routes.yaml,
loaded off the event loop (compose handlers are imported when a config loads, as startup and
reload do), with its services' URLs given through the file's ${VAR}s."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from blockbuster import BlockBuster, blockbuster_ctx
from pytest_aiohttp import AiohttpClient

from gateway.config.build import load
from gateway.runtime.state import Gateway
from tests.gateway.conftest import GatewayClient, GatewayTestServer

REPO: Path = Path(__file__).resolve().parents[2]
MakeGateway = Callable[[Path, dict[str, str]], Awaitable[GatewayClient]]


@pytest.fixture(autouse=True)
def no_blocking_in_loop() -> Iterator[BlockBuster]:
    with blockbuster_ctx() as blockbuster:
        yield blockbuster


@pytest.fixture
def gateway_from(aiohttp_client: AiohttpClient) -> MakeGateway:
    async def make(config: Path, environ: dict[str, str]) -> GatewayClient:
        result = await asyncio.to_thread(load, config, environ)
        assert result.config is not None, [str(e) for e in result.errors]
        client: object = await aiohttp_client(GatewayTestServer(Gateway(result.config)))
        return cast(GatewayClient, client)

    return make
