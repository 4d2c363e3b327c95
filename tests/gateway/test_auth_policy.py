"""Per-route auth: scopes by method with "*", consumers, any_of, refusals before the body is
read, the access log's consumer, and the config checks (FILE:LINE:COL, never the secret)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load_text
from gateway.ops.accesslog import access_logger
from gateway.servers.admin import create_admin_app
from tests.gateway.conftest import GatewayTestServer
from tests.gateway.test_accesslog import Lines
from tests.tokens import (
    SECRET,
    GatewayClient,
    Seen,
    claims,
    compile_auth_gateway,
    counting_echo,
    private_key,
    sign,
    write_key,
)

READER, WRITER = "reader-key-0001", "writer-key-0002"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ROUTES = f"""
version: 1
auth:
  jwt: {{algorithms: [HS256], secret: "${{JWT_SECRET}}"}}
  api_keys:
    - {{consumer: reader, key_sha256: {digest(READER)}, scopes: [inventory:read]}}
    - {{consumer: writer, key_sha256: {digest(WRITER)},
       scopes: [inventory:read, inventory:write]}}
services:
  echo: {{targets: [$ECHO]}}
routes:
  - prefix: /api/inventory
    service: echo
    auth:
      any_of: [jwt, api_key]
      scopes: {{GET: [inventory:read], "*": [inventory:write]}}
  - prefix: /admin
    service: echo
    auth: {{any_of: [api_key], consumers: [writer]}}
"""


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, seen: Seen
) -> GatewayClient:
    echo: TestServer = await aiohttp_server(counting_echo(seen))
    gateway = await compile_auth_gateway(ROUTES, environ={"JWT_SECRET": SECRET}, echo=echo)
    made: object = await aiohttp_client(GatewayTestServer(gateway))
    return cast(GatewayClient, made)


@pytest.mark.parametrize(
    ("method", "key", "expected"),
    [
        ("GET", READER, 200),
        ("HEAD", READER, 200),  # HEAD follows GET
        ("POST", READER, 403),
        ("DELETE", READER, 403),
        ("POST", WRITER, 200),
        ("PATCH", WRITER, 200),
    ],
)
async def test_each_method_needs_its_scopes_and_star_covers_the_rest(
    client: GatewayClient, method: str, key: str, expected: int
) -> None:
    resp = await client.request(method, "/api/inventory/devices", headers={"X-API-Key": key})

    assert resp.status == expected


async def test_a_missing_scope_is_a_403_insufficient_scope_that_never_reaches_the_upstream(
    client: GatewayClient, seen: Seen
) -> None:
    resp = await client.post("/api/inventory/devices", headers={"X-API-Key": READER}, data=b"{}")
    problem = await resp.json()

    assert resp.status == 403
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer realm="gateway", error="insufficient_scope", scope="inventory:write"'
    )
    assert problem["detail"] == "this request needs the scope inventory:write"
    assert seen.paths == []


async def test_a_consumer_not_listed_is_a_403(client: GatewayClient, seen: Seen) -> None:
    refused = await client.get("/admin/x", headers={"X-API-Key": READER})
    admitted = await client.get("/admin/x", headers={"X-API-Key": WRITER})

    assert (refused.status, admitted.status) == (403, 200)
    assert seen.paths == ["/admin/x"]


async def test_any_of_admits_by_a_good_key_when_the_token_is_bad(client: GatewayClient) -> None:
    expired = sign(claims(exp=1), SECRET, "HS256")
    both = {"Authorization": f"Bearer {expired}", "X-API-Key": READER}

    admitted = await client.get("/api/inventory/x", headers=both)
    refused = await client.get("/api/inventory/x", headers={"Authorization": f"Bearer {expired}"})

    assert admitted.status == 200
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"] == (
        'Bearer realm="gateway", error="invalid_token", '
        'error_description="the token has expired", ApiKey realm="gateway"'
    )


async def test_a_refused_request_gets_its_answer_before_sending_its_body(
    client: GatewayClient, seen: Seen
) -> None:
    """The body is never read: the 401 arrives while the client still owes 1 MiB."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"POST /api/inventory/devices HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()

    assert status_line.startswith(b"HTTP/1.1 401 ")
    assert seen.paths == []


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    lines = Lines()
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(lines)
    try:
        yield lines
    finally:
        access_logger.removeHandler(lines)


async def test_the_access_log_names_the_consumer_and_never_the_credential(
    access_lines: Lines,
    client: GatewayClient,  # lines first: the log is enabled at start
) -> None:
    await client.get("/api/inventory/x", headers={"X-API-Key": WRITER})
    await client.get("/api/inventory/x", headers={"X-API-Key": "nope"})

    admitted, refused = await access_lines.wait_for(2)

    assert (admitted["consumer"], admitted["status"]) == ("writer", 200)
    assert (refused["consumer"], refused["status"]) == (None, 401)
    assert WRITER not in str(access_lines.records)


async def test_config_never_shows_the_jwt_secret(aiohttp_client: AiohttpClient) -> None:
    gateway = await compile_auth_gateway(
        ROUTES.replace("$ECHO", "http://127.0.0.1:1"), environ={"JWT_SECRET": SECRET}
    )
    admin = await aiohttp_client(create_admin_app(gateway))

    shown = await (await admin.get("/config")).text()
    routes = await (await admin.get("/routes")).text()

    assert SECRET not in shown
    assert SECRET not in routes
    assert SECRET not in repr(gateway.config)


# --- config checks ---------------------------------------------------------------------

HEAD = "version: 1\nservices:\n  s: {targets: ['http://127.0.0.1:1']}\n"
ROUTE = "routes:\n  - prefix: /a\n    service: s\n"


def jwt_doc(jwt: str, route_auth: str = "{any_of: [jwt]}") -> str:
    return f"{HEAD}auth:\n  jwt: {jwt}\n{ROUTE}    auth: {route_auth}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            jwt_doc("{algorithms: [HS256], secret: literal-secret-that-is-long-enough-32b}"),
            ["routes.yaml:5:38: auth.jwt.secret: write the secret as ${VAR}: a secret in the file would show in /config"],
        ),
        (
            jwt_doc('{algorithms: [HS256], secret: "${SHORT}"}'),
            ["routes.yaml:5:38: auth.jwt.secret: the secret is shorter than 32 bytes, the least HS256 allows (RFC 7518)"],
        ),
        (
            jwt_doc('{algorithms: [HS512], secret: "${LONG}"}'),
            ["routes.yaml:5:38: auth.jwt.secret: the secret is shorter than 64 bytes, the least HS512 allows (RFC 7518)"],
        ),
        (
            jwt_doc('{algorithms: [HS256, RS256], secret: "${LONG}"}'),
            ["routes.yaml:5:45: auth.jwt.secret: a secret cannot verify RS256: use public_key_file or jwks_url"],
        ),
        (
            jwt_doc("{algorithms: [HS256, RS256], public_key_file: RSA}"),
            ["routes.yaml:5:21: auth.jwt.algorithms: HS256 need a secret; public_key_file holds public keys"],
        ),
        (
            jwt_doc("{algorithms: [ES256], public_key_file: RSA}"),
            ["routes.yaml:5:47: auth.jwt.public_key_file: public_key_file holds a key that cannot verify ES256"],
        ),
        (
            jwt_doc("{algorithms: [RS256], public_key_file: missing.pem}"),
            ["routes.yaml:5:47: auth.jwt.public_key_file: cannot read public_key_file: No such file or directory"],
        ),
        (
            jwt_doc("{algorithms: [none], jwks_url: 'https://idp.example/jwks'}"),
            ["routes.yaml:5:22: auth.jwt.algorithms.0: must be one of: HS256, HS384, HS512, RS256, RS384, RS512, PS256, ES256, ES384, EdDSA"],
        ),
        (
            jwt_doc("{algorithms: [RS256], jwks_url: 'ftp://idp.example/jwks'}"),
            ["routes.yaml:5:40: auth.jwt.jwks_url: bad jwks_url: the scheme must be http or https"],
        ),
        (
            jwt_doc('{algorithms: [RS256], jwks_url: "https://a/j", public_key_file: RSA}'),
            ["routes.yaml:5:8: auth.jwt: give exactly one key: secret, public_key_file or jwks_url"],
        ),
        (
            f"{HEAD}{ROUTE}    auth: {{any_of: [jwt, api_key]}}\n",
            [
                "routes.yaml:7:21: routes.0.auth.any_of.0: jwt is not configured: add auth.jwt at the top level",
                "routes.yaml:7:26: routes.0.auth.any_of.1: api_key is not configured: add auth.api_keys at the top level",
            ],
        ),
        (
            f"{HEAD}{ROUTE}    auth: {{scopes: {{GET: [inventory:read]}}}}\n",
            ["routes.yaml:7:11: routes.0.auth: auth needs any_of: scopes and consumers mean nothing without a method"],
        ),
        (
            f"{HEAD}{ROUTE}    auth: {{any_of: [jwt], scopes: {{GETT: [x]}}}}\n",
            [
                "routes.yaml:7:21: routes.0.auth.any_of.0: jwt is not configured: add auth.jwt at the top level",
                "routes.yaml:7:36: routes.0.auth.scopes.GETT: name 'GETT' must be one of: *, GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            ],
        ),
        (
            f"{HEAD}auth:\n  api_keys:\n    - {{consumer: a, key_sha256: {'a' * 64}}}\n"
            f"    - {{consumer: b, key_sha256: {'a' * 64}}}\n{ROUTE}",
            ["routes.yaml:7:33: auth.api_keys.1.key_sha256: the same key is listed at auth.api_keys.0"],
        ),
    ],
    ids=[
        "literal-secret", "short-secret", "short-for-hs512", "secret-for-rsa", "hmac-with-public-key",
        "key-type-mismatch", "missing-key-file", "alg-none", "jwks-scheme", "two-keys",
        "method-not-configured", "scopes-without-method", "unknown-scope-method", "duplicate-key",
    ],
)  # fmt: skip
async def test_auth_config_errors_are_reported_at_file_line_col_without_the_secret(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    rsa_file = await asyncio.to_thread(write_key, tmp_path, private_key("RS256"))
    text = text.replace("missing.pem", str(tmp_path / "missing.pem"))
    environ = {"SHORT": "x" * 20, "LONG": "y" * 40}

    result = await asyncio.to_thread(
        load_text, text.replace(": RSA", f": {rsa_file}"), "routes.yaml", environ
    )

    errors = [str(e) for e in result.errors]
    assert [e.replace(str(rsa_file), "RSA") for e in errors] == [
        e.replace("RSA", "RSA") for e in expected
    ]
    assert not any(v in e for v in environ.values() for e in errors)
