"""auth.forward against a real loopback auth service that admits, refuses, errs, dies and hangs.

The authenticator is driven directly (the route policy that calls it is gateway.auth's), with
the gateway's own compiled config and Service: the auth service's pools, breakers and timeouts
are the ones every request uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.forward import ForwardAuth, forward_authenticator
from gateway.auth.identity import Identity, RequestFacts
from gateway.config.build import load_text
from gateway.http.errors import AuthUnavailable, Forbidden, Unauthenticated
from gateway.runtime.state import Gateway
from tests.gateway.conftest import MakeGateway, base_url, compile_gateway
from tests.polling import free_port

SECRET = "Bearer s3cret-token-value"


@dataclass
class AuthService:
    """What the loopback auth service saw, and how it answers: `mode` picks the answer."""

    mode: str = "admit"
    seen: list[tuple[str, str, list[tuple[str, str]], int]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            (request.method, request.path_qs, list(request.headers.items()), len(body))
        )
        match self.mode:
            case "admit":
                return web.Response(
                    headers={
                        "X-Consumer": "alice",
                        "X-Auth-Subject": "user-17",
                        "X-Auth-Scopes": "inventory:read inventory:write",
                        "X-User-Email": "alice@example.com",
                        "X-Not-Copied": "no",
                    }
                )
            case "refuse":
                return web.Response(
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="accounts"'}
                )
            case "forbid":
                return web.Response(status=403)
            case "redirect":
                return web.Response(status=302, headers={"Location": "/login"})
            case "error":
                return web.Response(status=500)
            case "hang":
                await self.release.wait()
        return web.Response()


@pytest.fixture
async def auth_service() -> AsyncIterator[tuple[AuthService, TestServer]]:
    service = AuthService()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", service.handle)
    server = TestServer(app)
    await server.start_server()
    yield service, server
    service.release.set()
    await server.close()


FORWARD = """
version: 1
services:
  accounts:
    targets: [$AUTH]
    timeouts: {read: 300ms, connect: 300ms}
    circuit_breaker: {failures: 3, open_for: 30s}
  echo: {targets: [http://127.0.0.1:1]}
auth:
  forward:
    service: accounts
    path: /verify
    copy_headers: [X-User-Email]
    {cache}
routes:
  - {prefix: /, service: echo}
"""


def facts(*pairs: tuple[str, str], method: str = "DELETE", path: str = "/api/x") -> RequestFacts:
    headers = CIMultiDict(pairs or [("Authorization", SECRET)])
    headers.setdefault("Host", "gw.example")
    return RequestFacts(method, path, CIMultiDictProxy(headers))


MakeForward = Callable[..., ForwardAuth]


@pytest.fixture
async def make_forward(
    auth_service: tuple[AuthService, TestServer],
) -> AsyncIterator[MakeForward]:
    gateways: list[Gateway] = []

    def make(cache: str = "", url: str | None = None) -> ForwardAuth:
        text = FORWARD.replace("{cache}", cache)
        text = text.replace("$AUTH", url or base_url(auth_service[1]))
        gateway = compile_gateway(text)
        gateways.append(gateway)
        auth = forward_authenticator(gateway.config.forward_auth, gateway.services)
        assert auth is not None
        return auth

    yield make
    for gateway in gateways:
        await gateway.close()


async def test_a_2xx_admits_with_the_consumer_scopes_and_copied_headers_of_the_answer(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    auth = make_forward()

    identity = await auth.authenticate(facts(("Authorization", SECRET), ("Cookie", "sid=1")))

    assert identity == Identity(
        "alice",
        "user-17",
        frozenset({"inventory:read", "inventory:write"}),
        "forward",
        (("X-User-Email", "alice@example.com"),),
    )
    assert auth.owned_headers == {"x-user-email"}  # a client's own X-User-Email never passes


async def test_the_auth_service_gets_method_path_and_credentials_but_no_body_or_other_headers(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    service, _ = auth_service
    auth = make_forward()

    await auth.authenticate(
        facts(
            ("Authorization", SECRET),
            ("Cookie", "sid=1"),
            ("X-API-Key", "k1"),
            ("X-Private", "not for the auth service"),
            ("Content-Length", "5"),
        )
    )

    [(method, path_qs, headers, body_length)] = service.seen
    assert (method, path_qs, body_length) == ("GET", "/verify", 0)
    sent = {name.lower(): value for name, value in headers}
    assert sent["authorization"] == SECRET
    assert sent["cookie"] == "sid=1"
    assert sent["x-api-key"] == "k1"
    assert sent["x-forwarded-method"] == "DELETE"
    assert sent["x-forwarded-uri"] == "/api/x"
    assert sent["x-forwarded-host"] == "gw.example"
    assert "x-private" not in sent
    assert "content-length" not in sent


async def test_a_401_is_relayed_with_the_services_challenge(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    auth_service[0].mode = "refuse"
    auth = make_forward()

    with pytest.raises(Unauthenticated) as refused:
        await auth.authenticate(facts())

    assert refused.value.headers == {"WWW-Authenticate": 'Bearer realm="accounts"'}
    assert SECRET not in refused.value.detail


async def test_a_403_is_relayed_as_forbidden(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    auth_service[0].mode = "forbid"
    auth = make_forward()

    with pytest.raises(Forbidden):
        await auth.authenticate(facts())


@pytest.mark.parametrize("mode", ["error", "redirect"])
async def test_an_answer_that_is_no_decision_is_503_never_an_admit(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward, mode: str
) -> None:
    auth_service[0].mode = mode
    auth = make_forward()

    with pytest.raises(AuthUnavailable) as unavailable:
        await auth.authenticate(facts())

    assert unavailable.value.status == 503


async def test_an_auth_service_that_hangs_is_503_within_its_read_timeout(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    auth_service[0].mode = "hang"
    auth = make_forward()
    started = time.monotonic()

    with pytest.raises(AuthUnavailable):
        await auth.authenticate(facts())

    assert time.monotonic() - started < 2.0  # read: 300ms


async def test_an_auth_service_that_died_is_503_and_its_breaker_opens(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    server = auth_service[1]
    auth = make_forward()
    assert await auth.authenticate(facts()) is not None
    await server.close()  # the auth service dies

    for _ in range(3):  # circuit_breaker.failures: 3
        with pytest.raises(AuthUnavailable):
            await auth.authenticate(facts())
    with pytest.raises(AuthUnavailable) as unavailable:
        await auth.authenticate(facts())

    assert not auth.service.has_available_target()  # the same breakers as any service
    assert "Retry-After" in unavailable.value.headers


async def test_nothing_listening_is_503(make_forward: MakeForward) -> None:
    auth = make_forward(url=f"http://127.0.0.1:{free_port()}")

    with pytest.raises(AuthUnavailable):
        await auth.authenticate(facts())


async def test_a_cached_decision_is_reused_per_credential_until_it_expires(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    service, _ = auth_service
    auth = make_forward("cache: 30s")
    now = [1000.0]
    auth._clock = lambda: now[0]

    first = await auth.authenticate(facts(("Authorization", SECRET)))
    again = await auth.authenticate(facts(("Authorization", SECRET), path="/other"))
    other = await auth.authenticate(facts(("Authorization", "Bearer another")))
    assert len(service.seen) == 2  # one ask per credential
    assert first == again == other

    now[0] += 31
    await auth.authenticate(facts(("Authorization", SECRET)))
    assert len(service.seen) == 3  # expired: asked again


async def test_refusals_are_cached_but_an_unavailable_auth_service_is_not(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    service, _ = auth_service
    auth = make_forward("cache: 30s")
    service.mode = "refuse"
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(facts())
    assert len(service.seen) == 1

    service.mode = "error"
    for _ in range(2):
        with pytest.raises(AuthUnavailable):
            await auth.authenticate(facts(("Authorization", "Bearer b")))
    assert len(service.seen) == 3  # a 503 is no decision: the next request asks again


async def test_the_cache_is_bounded_and_holds_no_secret(
    auth_service: tuple[AuthService, TestServer], make_forward: MakeForward
) -> None:
    service, _ = auth_service
    auth = make_forward("cache: 30s")
    auth._max = 2

    for token in ("Bearer one", "Bearer two", "Bearer three"):
        await auth.authenticate(facts(("Authorization", token)))
    await auth.authenticate(facts(("Authorization", "Bearer one")))  # evicted: asked again

    assert len(service.seen) == 4
    assert auth.cached == 2
    assert all(b"Bearer" not in key and len(key) == 32 for key in auth._cache)


def test_an_unknown_forward_service_is_reported_where_it_is_named() -> None:
    text = FORWARD.replace("{cache}", "").replace("$AUTH", "http://127.0.0.1:1")
    text = text.replace("service: accounts", "service: acounts")

    result = load_text(text, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [
        "routes.yaml:11:14: auth.forward.service: unknown service 'acounts';"
        " did you mean 'accounts'?"
    ]


def test_a_forward_path_must_be_absolute() -> None:
    text = FORWARD.replace("{cache}", "").replace("$AUTH", "http://127.0.0.1:1")
    text = text.replace("path: /verify", "path: verify")

    result = load_text(text, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [
        "routes.yaml:12:11: auth.forward.path: must start with '/'"
    ]


ROUTED = """
version: 1
auth:
  forward: {service: accounts, path: /verify, copy_headers: [X-User-Email]}
services:
  accounts: {targets: [$ACCOUNTS], timeouts: {read: 1s}}
  echo: {targets: [$ECHO]}
routes:
  - prefix: /api
    service: echo
    auth: {any_of: [forward], scopes: {GET: [inventory:read]}}
"""


async def test_a_route_guarded_by_forward_auth_admits_refuses_and_copies_headers(
    make_gateway: MakeGateway, auth_service: tuple[AuthService, TestServer]
) -> None:
    service, server = auth_service
    client = await make_gateway(ROUTED, accounts=server)

    admitted = await client.get(
        "/api/x", headers={"Authorization": SECRET, "X-User-Email": "spoof@evil.example"}
    )
    seen = dict((await admitted.json())["headers"])
    service.mode = "refuse"
    refused = await client.get("/api/x", headers={"Authorization": "Bearer other"})

    assert admitted.status == 200
    assert seen["X-Consumer"] == "alice"
    assert seen["X-User-Email"] == "alice@example.com"  # the auth service's, not the client's
    assert refused.status == 401
    assert "accounts" in refused.headers["WWW-Authenticate"]
    assert [path for _, path, _, _ in service.seen] == ["/verify", "/verify"]
