"""auth.jwt with jwks_url: a real JWKS endpoint on loopback that rotates its key, a clock the
test moves (no sleeping), and the gateway's own aiohttp client doing the fetching."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.auth.jwks import MIN_REFETCH, JwksStore
from tests.gateway.conftest import GatewayTestServer
from tests.polling import eventually
from tests.tokens import (
    GatewayClient,
    JwksEndpoint,
    PrivateKey,
    Seen,
    claims,
    compile_auth_gateway,
    counting_echo,
    jwk_of,
    private_key,
    sign,
)

ROUTES = """
version: 1
auth:
  jwt: {algorithms: [RS256, ES256], jwks_url: "$JWKS/jwks.json", jwks_refresh: 5m}
services:
  echo: {targets: [$ECHO]}
routes:
  - {prefix: /api, service: echo, auth: {any_of: [jwt]}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def endpoint() -> JwksEndpoint:
    return JwksEndpoint()


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    endpoint: JwksEndpoint,
    seen: Seen,
    clock: Clock,
) -> GatewayClient:
    jwks: TestServer = await aiohttp_server(endpoint.app())
    echo: TestServer = await aiohttp_server(counting_echo(seen))
    gateway = await compile_auth_gateway(ROUTES, jwks=jwks, echo=echo)
    gateway.jwks = JwksStore(clock=clock)  # the test moves time for the JWKS rules
    gateway.swap(gateway.config)
    made: object = await aiohttp_client(GatewayTestServer(gateway))
    return cast(GatewayClient, made)


async def status(client: GatewayClient, token: str) -> int:
    async with client.get("/api/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


def token(key: PrivateKey, kid: str, alg: str = "RS256", **extra: Any) -> str:
    return sign(claims(**extra), key, alg, kid=kid)


async def test_keys_are_fetched_once_and_reused(
    client: GatewayClient, endpoint: JwksEndpoint
) -> None:
    rsa_key, ec_key = private_key("RS256"), private_key("ES256")
    endpoint.keys = [jwk_of(rsa_key, "r1"), jwk_of(ec_key, "e1")]

    statuses = [await status(client, token(rsa_key, "r1", n=n)) for n in range(3)]
    statuses.append(await status(client, token(ec_key, "e1", "ES256")))

    assert statuses == [200, 200, 200, 200]
    assert endpoint.fetches == 1


async def test_a_rotated_key_is_fetched_when_a_token_names_it_at_most_once_per_30_s(
    client: GatewayClient, endpoint: JwksEndpoint, clock: Clock
) -> None:
    old, new = private_key("RS256"), private_key("RS256")
    endpoint.keys = [jwk_of(old, "k1")]
    assert await status(client, token(old, "k1")) == 200
    endpoint.keys = [jwk_of(old, "k1"), jwk_of(new, "k2")]  # the issuer rotates

    clock.now += 5  # within 30 s of the first fetch: unknown kids fetch nothing
    early = [await status(client, token(new, "k2", n=n)) for n in range(5)]
    fetches_early = endpoint.fetches
    clock.now += MIN_REFETCH
    late = [await status(client, token(new, "k2", n=n)) for n in range(5)]

    assert (early, fetches_early) == ([401] * 5, 1)
    assert (late, endpoint.fetches) == ([200] * 5, 2)


async def test_a_kid_that_looks_like_a_path_or_is_huge_is_just_an_unknown_kid(
    client: GatewayClient, endpoint: JwksEndpoint, seen: Seen, clock: Clock
) -> None:
    key = private_key("RS256")
    endpoint.keys = [jwk_of(key, "k1")]
    assert await status(client, token(key, "k1")) == 200
    clock.now += MIN_REFETCH

    answers = [
        await status(client, token(key, "../../../../etc/passwd")),
        await status(client, token(key, "file:///etc/passwd")),
        await status(client, token(key, "k" * 5000)),
    ]

    assert answers == [401, 401, 401]
    assert endpoint.fetches == 2  # one refetch for all three, then the 30 s rule
    assert seen.paths == ["/api/x"]


async def test_a_failed_fetch_keeps_the_last_good_set(
    client: GatewayClient, endpoint: JwksEndpoint, clock: Clock
) -> None:
    key = private_key("RS256")
    endpoint.keys = [jwk_of(key, "k1")]
    assert await status(client, token(key, "k1")) == 200
    endpoint.status = 500
    clock.now += 301  # the refresh is due: it fails in the background

    assert await status(client, token(key, "k1", n=1)) == 200
    await eventually(lambda: endpoint.fetches == 2)
    assert await status(client, token(key, "k1", n=2)) == 200


async def test_a_key_removed_from_the_set_stops_validating_after_the_next_refresh(
    client: GatewayClient, endpoint: JwksEndpoint, clock: Clock
) -> None:
    old, new = private_key("RS256"), private_key("RS256")
    endpoint.keys = [jwk_of(old, "k1"), jwk_of(new, "k2")]
    cached = token(old, "k1")
    assert await status(client, cached) == 200
    endpoint.keys = [jwk_of(new, "k2")]  # k1 withdrawn
    clock.now += 301

    await status(client, cached)  # starts the refresh; this one may still use the old set
    await eventually(lambda: endpoint.fetches == 2)

    assert await status(client, cached) == 401  # its cached verdict is gone too
    assert await status(client, token(new, "k2")) == 200


async def test_an_hmac_key_in_a_jwks_never_verifies(
    client: GatewayClient, endpoint: JwksEndpoint, seen: Seen
) -> None:
    key = private_key("RS256")
    secret = "k" * 64
    endpoint.keys = [
        jwk_of(key, "k1"),
        {"kty": "oct", "kid": "shared", "k": "a" * 86},  # a secret someone published
    ]

    forged = sign(claims(), secret, "HS256", kid="shared")

    assert await status(client, forged) == 401
    assert seen.paths == []
