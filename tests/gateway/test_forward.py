"""What the upstream receives and what the client gets back through a plain route."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest
from yarl import URL

from tests.gateway.conftest import ECHO_ROUTE, MakeGateway
from tests.upstreams import GZIP_BODY


def header(seen: dict[str, object], name: str) -> list[str]:
    pairs = seen["headers"]
    assert isinstance(pairs, list)
    return [v for k, v in pairs if k.lower() == name.lower()]


async def test_strip_prefix_keeps_query_bytes(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)
    raw = URL(f"{client.make_url('/')}api/inventory/devices/7?a=%2F&b=c+d&e=%zz", encoded=True)

    resp = await client.session.get(raw)

    assert (await resp.json())["path_qs"] == "/devices/7?a=%2F&b=c+d&e=%zz"


async def test_prefix_itself_forwards_as_root(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    seen = await (await client.get("/api/inventory")).json()

    assert seen["path_qs"] == "/"
    assert header(seen, "X-Forwarded-Prefix") == ["/api/inventory"]


async def test_without_strip_the_path_is_kept_and_no_prefix_header(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)

    seen = await (await client.get("/echo/a/b")).json()

    assert seen["path_qs"] == "/echo/a/b"
    assert header(seen, "X-Forwarded-Prefix") == []


async def test_hop_by_hop_and_connection_listed_headers_are_dropped(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get(
        "/echo/x",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "must not pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "X-Kept": "yes",
        },
    )
    seen = await resp.json()

    names = {k.lower() for k, _ in seen["headers"]}
    assert {"x-secret", "keep-alive", "te", "proxy-authorization"}.isdisjoint(names)
    assert header(seen, "X-Kept") == ["yes"]


async def test_response_connection_listed_headers_are_dropped(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/echo/x", headers={"X-Echo-Connection": "X-Hop"})

    assert "X-Hop" not in resp.headers
    assert resp.status == 200


async def test_two_set_cookie_headers_survive(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/echo/x")

    assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_gzip_body_arrives_byte_identical(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/tools/gzip", auto_decompress=False)
    body = await resp.read()

    assert resp.headers["Content-Encoding"] == "gzip"
    assert body == GZIP_BODY
    assert gzip.decompress(body).startswith(b'{"compressed"')


async def test_upstream_gets_forwarded_headers_and_no_client_host(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)

    seen = await (await client.get("/echo/x", headers={"X-Forwarded-For": "6.6.6.6"})).json()

    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"]  # untrusted peer: replaced
    assert header(seen, "X-Forwarded-Proto") == ["http"]
    assert header(seen, "X-Forwarded-Host") == [f"127.0.0.1:{client.port}"]
    assert header(seen, "Host") != header(seen, "X-Forwarded-Host")


async def test_trusted_proxy_forwarded_for_is_extended(make_gateway: MakeGateway) -> None:
    client = await make_gateway(
        ECHO_ROUTE.replace("version: 1", "version: 1\ntrusted_proxies: [127.0.0.0/8]")
    )

    resp = await client.get(
        "/echo/x", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    )
    seen = await resp.json()

    assert header(seen, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert header(seen, "X-Forwarded-Proto") == ["https"]


async def test_sane_request_id_is_kept_and_echoed(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/echo/x", headers={"X-Request-ID": "abc-123"})
    seen = await resp.json()

    assert header(seen, "X-Request-ID") == ["abc-123"]
    assert resp.headers["X-Request-ID"] == "abc-123"


async def test_insane_request_id_is_replaced(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/echo/x", headers={"X-Request-ID": "bad id\twith spaces" * 20})
    seen = await resp.json()

    generated = resp.headers["X-Request-ID"]
    assert len(generated) == 32
    assert header(seen, "X-Request-ID") == [generated]


async def test_valid_traceparent_passes_and_missing_one_is_started(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    passed = await (await client.get("/echo/x", headers={"traceparent": parent})).json()
    started = await (await client.get("/echo/x")).json()

    assert header(passed, "traceparent") == [parent]
    (new,) = header(started, "traceparent")
    version, trace, span, flags = new.split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")


async def test_identity_headers_from_clients_are_removed(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get(
        "/echo/x", headers={"X-Consumer": "admin", "X-Auth-Scopes": "all", "X-Auth-Subject": "root"}
    )
    seen = await resp.json()

    names = {k.lower() for k, _ in seen["headers"]}
    assert {"x-consumer", "x-auth-scopes", "x-auth-subject"}.isdisjoint(names)


async def test_header_transforms_apply_both_ways(make_gateway: MakeGateway) -> None:
    routes = """
version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - prefix: /
    service: echo
    request_headers: {set: {X-Gateway: "true"}, remove: [Cookie]}
    response_headers: {set: {X-Frame-Options: DENY}, remove: [Set-Cookie]}
"""
    client = await make_gateway(routes)

    resp = await client.get("/x", headers={"Cookie": "session=1", "X-Gateway": "spoofed"})
    seen = await resp.json()

    assert header(seen, "X-Gateway") == ["true"]
    assert header(seen, "Cookie") == []
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "Set-Cookie" not in resp.headers


async def test_a_set_rule_replaces_a_header_the_forwarder_writes_itself(
    make_gateway: MakeGateway,
) -> None:
    routes = """
version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - prefix: /
    service: echo
    request_headers: {set: {X-Forwarded-Proto: https, X-Gateway: "true"}}
"""
    client = await make_gateway(routes)

    seen = await (await client.get("/x", headers={"X-Forwarded-Proto": "gopher"})).json()

    assert header(seen, "X-Forwarded-Proto") == ["https"]  # the rule's, not the gateway's "http"
    assert header(seen, "X-Gateway") == ["true"]
    assert header(seen, "X-Request-ID") != []  # the other headers it writes are still there


async def test_gateway_never_advertises_its_server_software(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    missing = await client.get("/nowhere")

    assert "Server" not in missing.headers


async def test_chunked_upload_streams_to_upstream(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield os.urandom(65536)

    seen = await (await client.post("/echo/upload", data=body())).json()

    assert seen["body_length"] == 64 * 65536
    assert seen["chunked"] is True


async def test_content_length_upload_keeps_its_length(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    seen = await (await client.put("/echo/x", data=b"z" * 100_000)).json()

    assert seen["body_length"] == 100_000
    assert header(seen, "Content-Length") == ["100000"]


async def test_large_download_streams_intact(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.get("/tools/stream?mib=32")
    digest, size = hashlib.sha256(), 0
    async for chunk in resp.content.iter_chunked(2**16):
        digest.update(chunk)
        size += len(chunk)

    assert size == 32 * 2**20
    assert digest.hexdigest() == hashlib.sha256(b"x" * 32 * 2**20).hexdigest()


async def test_head_request_gets_headers_only(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    resp = await client.head("/tools/stream?mib=1")

    assert resp.status == 200
    assert await resp.read() == b""


async def test_server_sent_events_arrive_as_produced(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)
    loop = asyncio.get_running_loop()

    resp = await client.get("/tools/sse")
    first = await resp.content.readuntil(b"\n\n")
    got_first_at = loop.time()
    rest = await resp.content.read()
    done_at = loop.time()

    assert first == b'data: {"n": 0}\n\n'
    assert rest.count(b"data:") == 2
    assert done_at - got_first_at > 0.3  # the first event came before the stream ended


async def test_a_trusted_proxy_without_forwarded_for_is_still_believed_on_proto(
    make_gateway: MakeGateway,
) -> None:
    trusted = ECHO_ROUTE.replace("version: 1", "version: 1\ntrusted_proxies: [127.0.0.0/8]")
    client = await make_gateway(trusted)

    resp = await client.get(
        "/echo/x", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.example"}
    )
    seen = await resp.json()

    assert header(seen, "X-Forwarded-Proto") == ["https"]
    assert header(seen, "X-Forwarded-Host") == ["shop.example"]
    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"]


class QuietWSGIHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def wsgi_environ_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answers with the HTTP_* variables the WSGI server made of the request's headers."""
    seen = {key: value for key, value in environ.items() if key.startswith("HTTP_")}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


@pytest.fixture
def wsgi_upstream() -> Iterator[str]:
    """A real wsgiref server in a thread (it folds X_Consumer and X-Consumer into one
    variable, as WSGI and CGI servers do); yields its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_environ_app, handler_class=QuietWSGIHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


WSGI_ROUTES = """
version: 1
underscores_in_headers: {allow}
services:
  wsgi: {{targets: ["{url}"]}}
routes:
  - prefix: /
    service: wsgi
    request_headers: {{remove: [X-Internal, X_Other]}}
"""
SPOOFS = {
    "X_Consumer": "admin",
    "X_Forwarded_For": "6.6.6.6",
    "X_Auth_Scopes": "inventory:write",
    "X_Request_Id": "forged",
    "Proxy_Authorization": "Basic YWRtaW46YWRtaW4=",
    "X_Internal": "from the client",
    "Connection": "X-Secret",
    "X_Secret": "hop",
}


async def test_underscored_header_names_never_reach_a_wsgi_upstream_by_default(
    make_gateway: MakeGateway, wsgi_upstream: str
) -> None:
    client = await make_gateway(WSGI_ROUTES.format(allow="false", url=wsgi_upstream))

    resp = await client.get("/x", headers={**SPOOFS, "X_Custom": "1", "X-Plain": "2"})
    environ = await resp.json()

    assert resp.status == 200
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"  # not "6.6.6.6,127.0.0.1"
    assert environ["HTTP_X_REQUEST_ID"] == resp.headers["X-Request-ID"]
    assert environ["HTTP_X_PLAIN"] == "2"
    assert {"HTTP_X_CONSUMER", "HTTP_X_AUTH_SCOPES", "HTTP_X_CUSTOM"}.isdisjoint(environ)


async def test_allowed_underscores_pass_but_never_as_a_gateway_owned_or_hop_by_hop_name(
    make_gateway: MakeGateway, wsgi_upstream: str
) -> None:
    client = await make_gateway(WSGI_ROUTES.format(allow="true", url=wsgi_upstream))

    resp = await client.get("/x", headers={**SPOOFS, "X_Custom": "1", "X-Other": "folded"})
    environ = await resp.json()

    assert resp.status == 200
    assert environ["HTTP_X_CUSTOM"] == "1"
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert environ["HTTP_X_REQUEST_ID"] == resp.headers["X-Request-ID"]
    dropped = {"HTTP_X_CONSUMER", "HTTP_X_AUTH_SCOPES", "HTTP_PROXY_AUTHORIZATION"}
    assert dropped.isdisjoint(environ)
    assert {"HTTP_X_INTERNAL", "HTTP_X_OTHER"}.isdisjoint(environ)  # removed by the route
    assert "HTTP_X_SECRET" not in environ  # listed by Connection


async def test_a_route_may_allow_underscores_that_the_top_level_drops(
    make_gateway: MakeGateway,
) -> None:
    routes = ECHO_ROUTE + "  - {prefix: /legacy, service: echo, underscores_in_headers: true}\n"
    client = await make_gateway(routes)

    strict = await (await client.get("/echo/x", headers={"X_Custom": "1"})).json()
    legacy = await (await client.get("/legacy/x", headers={"X_Custom": "1"})).json()

    assert header(strict, "X_Custom") == []
    assert [(k, v) for k, v in legacy["headers"] if k == "X_Custom"] == [("X_Custom", "1")]
