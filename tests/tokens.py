"""Keys and tokens for auth tests: real keys generated with cryptography, tokens signed with
PyJWT (or forged by hand where PyJWT refuses to make the hostile thing), a JWKS endpoint on
loopback whose key set a test rotates, and an echo upstream that counts what reaches it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.config.build import load_text
from gateway.runtime.state import Gateway
from tests.upstreams import make_echo_app

SECRET = "s3cr3t-" + "k" * 57  # 64 bytes: long enough for HS512
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def private_key(alg: str) -> PrivateKey:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, "scope": "inventory:read", **extra}


def sign(payload: Mapping[str, Any], key: PrivateKey | str, alg: str, **headers: Any) -> str:
    return jwt.encode(dict(payload), key, algorithm=alg, headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(
    header: Mapping[str, Any] | bytes, payload: Mapping[str, Any], secret: bytes
) -> str:
    """An HS256 token made by hand: with any bytes as the secret (a public key's PEM, which
    PyJWT refuses), or a header that is not UTF-8 JSON."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    signing_input = f"{b64(raw)}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def sign_rs256_raw(header_segment: str, payload_segment: str, key: PrivateKey) -> str:
    assert isinstance(key, rsa.RSAPrivateKey)
    """A correctly RS256-signed token over segments as given (a UTF-16 header, stray
    characters): only the gateway's strict parsing stands between it and admission."""
    signing_input = f"{header_segment}.{payload_segment}"
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(
        signing_input.encode(), key
    )
    return f"{signing_input}.{b64(signature)}"


def jwk_of(key: PrivateKey, kid: str) -> dict[str, Any]:
    algorithm: Any = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(key, rsa.RSAPrivateKey)
        else jwt.algorithms.ECAlgorithm
        if isinstance(key, ec.EllipticCurvePrivateKey)
        else jwt.algorithms.OKPAlgorithm
    )
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig"}


@dataclass
class JwksEndpoint:
    """A JWKS endpoint: `keys` is what it serves now; `status` other than 200 fails it."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    fetches: int = 0

    def app(self) -> web.Application:
        async def serve(request: web.Request) -> web.Response:
            self.fetches += 1
            if self.status != 200:
                return web.Response(status=self.status, text="down")
            return web.json_response({"keys": self.keys})

        app = web.Application()
        app.router.add_get("/jwks.json", serve)
        return app


@dataclass
class Seen:
    """The requests that reached the counting echo upstream."""

    paths: list[str] = field(default_factory=list)


def counting_echo(seen: Seen) -> web.Application:
    app = make_echo_app()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.paths.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(count)
    return app


async def compile_auth_gateway(
    routes: str, environ: Mapping[str, str] | None = None, **servers: TestServer
) -> Gateway:
    """A Gateway for `routes`, $NAME standing for each server's URL; compiled off the loop
    (key files are read while loading)."""
    for name, server in servers.items():
        routes = routes.replace(f"${name.upper()}", str(server.make_url("")).rstrip("/"))
    result = await asyncio.to_thread(load_text, routes, "routes.yaml", dict(environ or {}))
    assert result.config is not None, [str(e) for e in result.errors]
    return Gateway(result.config)


def write_key(tmp_path: Path, key: PrivateKey, name: str = "key.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(public_pem(key))
    return path


GatewayClient = TestClient[web.Request, web.Application]
