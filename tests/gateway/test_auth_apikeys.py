"""auth.api_keys: keys in X-API-Key or `Authorization: ApiKey`, only hashes in the config,
`python -m gateway hash-key`, and what the upstream is (and is not) sent."""

from __future__ import annotations

import hashlib
import io
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.__main__ import main
from gateway.auth.apikeys import ApiKeyAuthenticator, hash_key
from gateway.auth.identity import CredentialRejected, RequestFacts, upstream_headers
from gateway.config.build import load_text
from tests.gateway.conftest import GatewayTestServer
from tests.tokens import GatewayClient, Seen, compile_auth_gateway, counting_echo

KEY = "k-7f3a9c1e5b2d4068"
ROUTES = f"""
version: 1
auth:
  api_keys:
    - {{consumer: thermostat, key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()},
       scopes: [inventory:read]}}
services:
  echo: {{targets: [$ECHO]}}
routes:
  - {{prefix: /api, service: echo, auth: {{any_of: [api_key]}}}}
  - {{prefix: /strip, service: echo, auth: {{any_of: [api_key], strip_credentials: true}}}}
"""


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, seen: Seen
) -> GatewayClient:
    echo: TestServer = await aiohttp_server(counting_echo(seen))
    gateway = await compile_auth_gateway(ROUTES, echo=echo)
    made: object = await aiohttp_client(GatewayTestServer(gateway))
    return cast(GatewayClient, made)


def sent(body: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in body["headers"] if k.lower() == name.lower()]


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": KEY}, {"Authorization": f"ApiKey {KEY}"}, {"Authorization": f"apikey  {KEY}"}],
    ids=["x-api-key", "authorization", "scheme-case-and-spaces"],
)
async def test_a_known_key_admits_as_its_consumer(
    client: GatewayClient, headers: dict[str, str]
) -> None:
    spoofed = {  # the client's own claims: replaced, never passed on
        "X-Consumer": "admin",
        "X-Auth-Subject": "root",
        "X-Auth-Scopes": "inventory:write admin",
        "X_Consumer": "admin",
    }
    for _ in range(2):  # the key verified, then remembered
        resp = await client.get("/api/devices", headers={**spoofed, **headers})
        body = await resp.json()

        assert resp.status == 200, body
        assert sent(body, "X-Consumer") == ["thermostat"]
        assert sent(body, "X-Auth-Subject") == ["thermostat"]
        assert sent(body, "X-Auth-Scopes") == ["inventory:read"]
        assert sent(body, "X_Consumer") == []


async def test_credentials_go_upstream_unless_the_route_strips_them(client: GatewayClient) -> None:
    kept = await (await client.get("/api/x", headers={"X-API-Key": KEY})).json()
    stripped = await (
        await client.get("/strip/x", headers={"X-API-Key": KEY, "Authorization": f"ApiKey {KEY}"})
    ).json()

    assert sent(kept, "X-API-Key") == [KEY]
    assert sent(stripped, "X-API-Key") == []
    assert sent(stripped, "Authorization") == []
    assert sent(stripped, "X-Consumer") == ["thermostat"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"X-API-Key": "x" * 5000},
        {"Authorization": f"ApiKey {KEY}x"},
        {"Authorization": f"Bearer {KEY}"},  # a key is not a token
    ],
    ids=["none", "unknown", "empty", "huge", "unknown-in-authorization", "as-bearer"],
)
async def test_a_missing_or_unknown_key_is_a_401_with_both_challenges(
    client: GatewayClient, seen: Seen, headers: dict[str, str]
) -> None:
    resp = await client.get("/api/x", headers=headers)
    problem = await resp.json()

    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway", ApiKey realm="gateway"'
    assert KEY not in str(problem)
    assert seen.paths == []


def test_hash_key_prints_the_sha256_of_the_key_read_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{KEY}\n"))

    code = main(["hash-key"])

    assert code == 0
    assert capsys.readouterr().out == hashlib.sha256(KEY.encode()).hexdigest() + "\n"


def test_hash_key_refuses_an_empty_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))

    assert main(["hash-key"]) == 2
    assert "no key" in capsys.readouterr().err


def key_facts(key: str) -> RequestFacts:
    return RequestFacts("GET", "/", CIMultiDictProxy(CIMultiDict({"X-API-Key": key})))


def test_only_keys_that_verified_are_remembered_so_spraying_keys_grows_nothing() -> None:
    other = "k-other-2b9d"
    keys = ApiKeyAuthenticator(
        [
            (hash_key(KEY), "thermostat", frozenset({"inventory:read"})),
            (hash_key(other), "b", frozenset()),
        ]
    )
    for i in range(2000):  # a client spraying keys: each is hashed, refused, forgotten
        with pytest.raises(CredentialRejected):
            keys.identify(key_facts(f"{KEY}-{i}"))
    assert keys.remembered() == 0

    first = keys.identify(key_facts(KEY))
    again = keys.identify(key_facts(f"  {KEY} "))  # the same key, as api_key() reads it
    assert first is not None
    assert first is again
    assert first.consumer == "thermostat"
    assert keys.remembered() == 1
    with pytest.raises(CredentialRejected):  # one character off a remembered key
        keys.identify(key_facts(KEY[:-1] + "0"))
    keys.identify(key_facts(other))
    assert keys.remembered() == 2  # never more than the keys configured


def test_an_api_key_identity_carries_the_upstream_headers_made_once() -> None:
    keys = ApiKeyAuthenticator([(hash_key(KEY), "thermostat", frozenset({"b:w", "a:r"}))])
    identity = keys.identify(key_facts(KEY))
    assert identity is not None
    assert (
        identity.sent_up
        == upstream_headers(identity)
        == (
            ("X-Consumer", "thermostat"),
            ("X-Auth-Subject", "thermostat"),
            ("X-Auth-Scopes", "a:r b:w"),
        )
    )


async def test_a_key_removed_by_a_reload_is_refused_though_it_was_remembered(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, seen: Seen
) -> None:
    echo: TestServer = await aiohttp_server(counting_echo(seen))
    gateway = await compile_auth_gateway(ROUTES, echo=echo)
    client = cast(GatewayClient, await aiohttp_client(GatewayTestServer(gateway)))
    assert (await client.get("/api/x", headers={"X-API-Key": KEY})).status == 200
    assert (await client.get("/api/x", headers={"X-API-Key": KEY})).status == 200

    url = str(echo.make_url("")).rstrip("/")
    without = ROUTES.replace(hashlib.sha256(KEY.encode()).hexdigest(), hash_key("another key"))
    assert gateway.apply(load_text(without.replace("$ECHO", url), "routes.yaml", environ={}))

    assert (await client.get("/api/x", headers={"X-API-Key": KEY})).status == 401
