"""auth.jwt end to end: real tokens signed in the tests, verified by the gateway in front of a
counting echo upstream. A refused request never reaches the upstream; an admitted one arrives
with the identity headers the gateway set, whatever the client sent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.auth.identity import RequestFacts
from gateway.auth.jwt import CACHE_SIZE, JwtAuthenticator, JwtRules, StaticKey, VerifyKey
from tests.gateway.conftest import GatewayTestServer
from tests.tokens import (
    SECRET,
    GatewayClient,
    PrivateKey,
    Seen,
    b64,
    claims,
    compile_auth_gateway,
    counting_echo,
    forge_hs256,
    private_key,
    public_pem,
    sign,
    sign_rs256_raw,
    write_key,
)

KEY_ROUTES = """
version: 1
auth:
  jwt:
    algorithms: [ALG]
    public_key_file: KEYFILE
    issuer: https://issuer.example
    audience: gateway
    leeway: 10s
services:
  echo: {targets: [$ECHO]}
routes:
  - prefix: /api
    service: echo
    auth: {any_of: [jwt]}
  - prefix: /open
    service: echo
"""
SECRET_ROUTES = """
version: 1
auth:
  jwt: {algorithms: [HS256], secret: "${JWT_SECRET}", consumer_claim: client_id}
services:
  echo: {targets: [$ECHO]}
routes:
  - prefix: /api
    service: echo
    auth: {any_of: [jwt]}
"""
GOOD = {"iss": "https://issuer.example", "aud": "gateway"}


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer, seen: Seen) -> TestServer:
    return await aiohttp_server(counting_echo(seen))


@pytest.fixture
def rsa_key() -> PrivateKey:
    return private_key("RS256")


async def serve(aiohttp_client: AiohttpClient, routes: str, **kwargs: Any) -> GatewayClient:
    gateway = await compile_auth_gateway(routes, **kwargs)
    client: object = await aiohttp_client(GatewayTestServer(gateway))
    return cast(GatewayClient, client)


async def key_routes(tmp_path: Path, key: PrivateKey, alg: str) -> str:
    path = await asyncio.to_thread(write_key, tmp_path, key)  # no file writes on the loop
    return KEY_ROUTES.replace("ALG", alg).replace("KEYFILE", str(path))


def headers_seen(body: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in body["headers"] if k.lower() == name.lower()]


@pytest.mark.parametrize("alg", ["RS256", "RS512", "PS256", "ES256", "ES384", "EdDSA"])
async def test_a_token_signed_with_the_configured_key_reaches_the_upstream_with_its_identity(
    aiohttp_client: AiohttpClient, echo: TestServer, tmp_path: Path, alg: str
) -> None:
    key = private_key(alg)
    client = await serve(aiohttp_client, await key_routes(tmp_path, key, alg), echo=echo)
    token = sign(claims(**GOOD, scope="inventory:read inventory:write"), key, alg)

    resp = await client.get("/api/x", headers={"Authorization": f"Bearer {token}"})
    body = await resp.json()

    assert resp.status == 200, body
    assert headers_seen(body, "X-Consumer") == ["alice"]
    assert headers_seen(body, "X-Auth-Subject") == ["alice"]
    assert headers_seen(body, "X-Auth-Scopes") == ["inventory:read inventory:write"]
    assert headers_seen(body, "Authorization") == [f"Bearer {token}"]  # not stripped


async def test_an_hs256_token_names_its_consumer_by_the_configured_claim(
    aiohttp_client: AiohttpClient, echo: TestServer
) -> None:
    client = await serve(aiohttp_client, SECRET_ROUTES, environ={"JWT_SECRET": SECRET}, echo=echo)
    payload = claims(client_id="thermostat-app", scp=["a", "b"])
    del payload["scope"]
    token = sign(payload, SECRET, "HS256")

    resp = await client.get("/api/x", headers={"Authorization": f"Bearer {token}"})
    body = await resp.json()

    assert resp.status == 200, body
    assert headers_seen(body, "X-Consumer") == ["thermostat-app"]
    assert headers_seen(body, "X-Auth-Subject") == ["alice"]
    assert headers_seen(body, "X-Auth-Scopes") == ["a b"]  # from scp, a list


def hostile_tokens(key: PrivateKey) -> dict[str, str]:
    now = int(time.time())
    good = claims(**GOOD)
    token = sign(good, key, "RS256")
    header, payload, signature = token.split(".")
    tampered = b64(b'{"sub":"admin","scope":"inventory:write","iss":"https://issuer.example"}')
    utf16 = '{"alg":"RS256","typ":"JWT"}'.encode("utf-16")
    none = b64(b'{"alg":"none","typ":"JWT"}')
    return {
        "expired": sign({**good, "exp": now - 60}, key, "RS256"),
        "not yet valid": sign({**good, "nbf": now + 120}, key, "RS256"),
        "issued in the future": sign({**good, "iat": now + 120}, key, "RS256"),
        "wrong issuer": sign({**good, "iss": "https://evil.example"}, key, "RS256"),
        "wrong audience": sign({**good, "aud": "someone-else"}, key, "RS256"),
        "no issuer": sign({k: v for k, v in good.items() if k != "iss"}, key, "RS256"),
        "tampered payload": f"{header}.{tampered}.{signature}",
        "alg none": f"{none}.{payload}.",
        "alg not pinned": sign(good, key, "RS512"),
        "algorithm confusion": forge_hs256({"alg": "HS256"}, good, public_pem(key)),
        "utf-16 header": sign_rs256_raw(b64(utf16), payload, key),
        "non-base64url characters": sign_rs256_raw(header, f"{payload[:8]}+/{payload[8:]}", key),
        "header not an object": f"{b64(b'[1,2]')}.{payload}.{signature}",
        "huge token": sign({**good, "pad": "x" * 9000}, key, "RS256"),
        "two segments": f"{header}.{payload}",
        "no consumer": sign({k: v for k, v in good.items() if k != "sub"}, key, "RS256"),
        "consumer with a line break": sign({**good, "sub": "a\r\nX-Consumer: admin"}, key, "RS256"),
    }


HOSTILE = list(hostile_tokens(private_key("RS256")))


@pytest.mark.parametrize("case", HOSTILE)
async def test_a_hostile_token_is_a_401_invalid_token_and_never_reaches_the_upstream(
    aiohttp_client: AiohttpClient,
    echo: TestServer,
    seen: Seen,
    tmp_path: Path,
    rsa_key: PrivateKey,
    case: str,
) -> None:
    client = await serve(aiohttp_client, await key_routes(tmp_path, rsa_key, "RS256"), echo=echo)
    token = hostile_tokens(rsa_key)[case]

    resp = await client.get("/api/x", headers={"Authorization": f"Bearer {token}"})
    problem = await resp.json()

    assert resp.status == 401, problem
    assert resp.content_type == "application/problem+json"
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="gateway", error="invalid_token"'), challenge
    assert token not in challenge
    assert token[:40] not in problem["detail"]
    assert seen.paths == []


async def test_a_token_expired_within_the_leeway_is_admitted(
    aiohttp_client: AiohttpClient, echo: TestServer, tmp_path: Path, rsa_key: PrivateKey
) -> None:
    client = await serve(aiohttp_client, await key_routes(tmp_path, rsa_key, "RS256"), echo=echo)
    token = sign(claims(**GOOD, exp=int(time.time()) - 3), rsa_key, "RS256")  # leeway: 10s

    resp = await client.get("/api/x", headers={"Authorization": f"Bearer {token}"})

    assert resp.status == 200


async def test_a_token_signed_by_another_key_of_the_same_type_is_refused(
    aiohttp_client: AiohttpClient, echo: TestServer, seen: Seen, tmp_path: Path
) -> None:
    client = await serve(
        aiohttp_client, await key_routes(tmp_path, private_key("ES256"), "ES256"), echo=echo
    )
    token = sign(claims(**GOOD), private_key("ES256"), "ES256")

    resp = await client.get("/api/x", headers={"Authorization": f"Bearer {token}"})

    assert resp.status == 401
    assert "signature does not verify" in (await resp.json())["detail"]
    assert seen.paths == []


async def test_no_credentials_is_a_plain_bearer_challenge(
    aiohttp_client: AiohttpClient, echo: TestServer, seen: Seen, tmp_path: Path, rsa_key: PrivateKey
) -> None:
    client = await serve(aiohttp_client, await key_routes(tmp_path, rsa_key, "RS256"), echo=echo)

    resp = await client.get("/api/x", headers={"Authorization": "Basic YTpi"})

    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert seen.paths == []


async def test_spoofed_identity_headers_never_reach_the_upstream_on_any_route(
    aiohttp_client: AiohttpClient, echo: TestServer, tmp_path: Path, rsa_key: PrivateKey
) -> None:
    client = await serve(aiohttp_client, await key_routes(tmp_path, rsa_key, "RS256"), echo=echo)
    token = sign(claims(**GOOD), rsa_key, "RS256")
    spoofed = {
        "X-Consumer": "admin",
        "X-Auth-Subject": "root",
        "X-Auth-Scopes": "inventory:write admin",
        "X_Consumer": "admin",
        "X-Forwarded-For": "10.9.9.9",  # from an untrusted peer: not believed
    }

    protected = await (
        await client.get("/api/x", headers={**spoofed, "Authorization": f"Bearer {token}"})
    ).json()
    unprotected = await (await client.get("/open/x", headers=spoofed)).json()

    assert headers_seen(protected, "X-Consumer") == ["alice"]
    assert headers_seen(protected, "X-Auth-Subject") == ["alice"]
    assert headers_seen(protected, "X-Auth-Scopes") == ["inventory:read"]
    assert headers_seen(protected, "X_Consumer") == []
    for body in (protected, unprotected):
        assert headers_seen(body, "X-Forwarded-For") == ["127.0.0.1"]
    for name in ("X-Consumer", "X-Auth-Subject", "X-Auth-Scopes", "X_Consumer"):
        assert headers_seen(unprotected, name) == []


async def test_a_spoofed_forwarded_for_does_not_admit_a_request_without_credentials(
    aiohttp_client: AiohttpClient, echo: TestServer, seen: Seen, tmp_path: Path, rsa_key: PrivateKey
) -> None:
    client = await serve(aiohttp_client, await key_routes(tmp_path, rsa_key, "RS256"), echo=echo)

    resp = await client.get("/api/x", headers={"X-Forwarded-For": "127.0.0.1, 10.0.0.1"})

    assert resp.status == 401
    assert seen.paths == []


# --- the verdict cache -------------------------------------------------------------------


class CountingKey(StaticKey):
    """A StaticKey that counts the verifications that needed a key."""

    finds: int = 0

    async def find(self, kid: str | None) -> VerifyKey | None:
        self.finds += 1
        return await super().find(kid)


def facts(token: str) -> RequestFacts:
    from multidict import CIMultiDict, CIMultiDictProxy

    return RequestFacts("GET", "/", CIMultiDictProxy(CIMultiDict(Authorization=f"Bearer {token}")))


def cached_authenticator(
    key: PrivateKey, clock: list[float], size: int = CACHE_SIZE
) -> tuple[JwtAuthenticator, CountingKey]:
    source = CountingKey(VerifyKey(key.public_key(), ("RS256",)))
    rules = JwtRules(frozenset({"RS256"}))
    return JwtAuthenticator(rules, source, clock=lambda: clock[0], cache_size=size), source


async def test_a_repeated_token_is_verified_once_until_it_expires(rsa_key: PrivateKey) -> None:
    now = [time.time()]
    authenticator, source = cached_authenticator(rsa_key, now)
    token = sign(claims(exp=int(now[0]) + 60), rsa_key, "RS256")

    for _ in range(5):
        assert (await authenticator.authenticate(facts(token))) is not None
    verified_while_valid = source.finds
    now[0] += 61  # past exp by the cache's clock: the verdict is not reused
    await authenticator.authenticate(facts(token))

    assert (verified_while_valid, source.finds) == (1, 2)


async def test_the_verdict_cache_is_bounded(rsa_key: PrivateKey) -> None:
    now = [time.time()]
    authenticator, source = cached_authenticator(rsa_key, now, size=2)
    tokens = [sign(claims(n=n), rsa_key, "RS256") for n in range(3)]

    for token in tokens:
        await authenticator.authenticate(facts(token))
    await authenticator.authenticate(facts(tokens[0]))  # evicted: verified again

    assert source.finds == 4
