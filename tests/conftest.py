"""Shared test settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from tests.redis_server import RedisServer, redis_server


@pytest.fixture(autouse=True)
def _quiet_access_log() -> None:
    """Access lines go through logging; keep them out of captured output noise."""
    logging.getLogger("gateway.access").setLevel(logging.WARNING)


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    """A private redis-server on a free port (or REDIS_URL); skips, saying how, without one."""
    async with redis_server() as server:
        yield server
