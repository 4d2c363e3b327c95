"""Client connection limits and parser rejections (CONTRACT §4, §7), over raw sockets against
the gateway served by its own runner (`GatewayRunner`), as in production."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from gateway.ops.accesslog import access_logger
from gateway.runtime.state import Gateway
from gateway.servers.connection import GatewayServer
from tests.gateway.conftest import GatewayTestServer, compile_gateway
from tests.gateway.test_accesslog import Lines
from tests.polling import eventually

ROUTES = """
version: 1
limits:
  header_timeout: 500ms
  keepalive_timeout: 500ms
  send_timeout: 500ms
  max_client_connections: 4
services:
  echo: {targets: [$ECHO]}
  tools: {targets: [$TOOLS], max_connections: 1}
routes:
  - prefix: /tools
    service: tools
    strip_prefix: true
  - prefix: /
    service: echo
"""

Served = tuple[Gateway, int, GatewayTestServer]
Serve = Callable[[str], Awaitable[Served]]


@pytest.fixture
async def serve(echo_upstream: TestServer, tools_upstream: TestServer) -> AsyncIterator[Serve]:
    servers: list[GatewayTestServer] = []

    async def start(routes: str = ROUTES) -> Served:
        gateway = compile_gateway(routes, echo=echo_upstream, tools=tools_upstream)
        server = GatewayTestServer(gateway)
        await server.start_server()
        servers.append(server)
        assert server.port is not None
        return gateway, server.port, server

    yield start
    for server in servers:
        await server.close()


async def exchange(port: int, data: bytes, *, within: float = 5.0) -> bytes:
    """Send raw bytes; return everything the gateway answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.decode().lower(): v.decode() for k, _, v in (x.partition(b": ") for x in lines)}
    return status, headers, body


async def closed_within(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the peer closed the connection (EOF or reset)."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), within):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def problem(answer: bytes, status: int) -> dict[str, object]:
    line, headers, body = parse(answer)
    assert line.startswith(b"HTTP/1.1 %d " % status), line
    assert headers["content-type"].startswith("application/problem+json")
    assert "server" not in headers  # no Python/... aiohttp/... banner
    assert headers.get("connection") == "close"
    doc: dict[str, object] = json.loads(body)
    assert doc["status"] == status
    assert doc["request_id"]
    return doc


# --- connection time limits ---------------------------------------------------------------


async def test_a_slowloris_head_is_closed_after_the_header_timeout(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()

    async def trickle() -> None:
        for i in range(100):  # a header line every 50 ms: never the end of the head
            writer.write(b"X-%d: 1\r\n" % i)
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    try:
        await closed_within(reader, 5.0)
    finally:
        dripping.cancel()
        writer.close()
    assert 0.45 <= time.monotonic() - started < 3.0


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    serve: Serve,
) -> None:
    gateway, port, _ = await serve(ROUTES)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seconds = await closed_within(reader, 5.0)
    writer.close()
    assert 0.4 <= seconds < 3.0
    assert b'reason="header_timeout"' in gateway.metrics.render()


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    serve: Serve,
) -> None:
    _, port, _ = await serve(ROUTES.replace("header_timeout: 500ms", "header_timeout: 10s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(parse(head)[1]["content-length"])
    await reader.readexactly(length)
    seconds = await closed_within(reader, 5.0)  # keep-alive, then nothing: closed at 0.5 s
    writer.close()
    assert 0.4 <= seconds < 3.0


async def test_connections_over_max_client_connections_are_closed_at_once(
    serve: Serve,
) -> None:
    gateway, port, server = await serve(
        ROUTES.replace("header_timeout: 500ms", "header_timeout: 10s")
    )
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    connections = server.runner.server if server.runner else None
    assert isinstance(connections, GatewayServer)
    await eventually(lambda: connections.open == 4)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed_within(reader, 2.0) < 1.0  # the fifth is closed straight away
    writer.close()
    assert b'reason="over_limit"' in gateway.metrics.render()
    for _, w in held:
        w.close()

    async def served() -> bool:  # slots come back as the held connections close
        answer = await exchange(port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return answer.startswith(b"HTTP/1.1 200")

    await eventually(served)


# --- a client that stops reading ----------------------------------------------------------


async def test_a_client_that_stops_reading_is_cut_and_frees_its_upstream_connection(
    serve: Serve,
) -> None:
    gateway, port, _ = await serve(ROUTES)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /tools/stream?mib=64 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
    tools = gateway.services["tools"]
    await eventually(lambda: tools.targets[0].in_flight == 1)
    # The one pooled connection (max_connections: 1) comes back once the reader is cut.
    await eventually(lambda: tools.targets[0].in_flight == 0, within=5.0)
    assert b'reason="send_timeout"' in gateway.metrics.render()
    answer = await exchange(
        port, b"GET /tools/stream?mib=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert len(parse(answer)[2]) == 2**20
    writer.close()


async def test_a_slow_but_reading_client_gets_the_whole_response(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES.replace("send_timeout: 500ms", "send_timeout: 2s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /tools/stream?mib=4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received = 0
    while chunk := await asyncio.wait_for(reader.read(256 * 1024), 5):
        received += len(chunk)
        await asyncio.sleep(0.01)  # slower than loopback, faster than the send timeout
    writer.close()
    assert received > 4 * 2**20


# --- header limits --------------------------------------------------------------------------


async def test_headers_over_the_byte_total_are_431(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))  # 20 KB
    answer = await exchange(port, b"GET /x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    doc = problem(answer, 431)
    assert "16384" in str(doc["detail"])


async def test_a_head_that_never_ends_is_refused_once_it_passes_the_total(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES.replace("header_timeout: 500ms", "header_timeout: 10s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")
    for i in range(40):  # 40 KB of header lines, sent in pieces, with no end in sight
        writer.write(b"X-%d: %s\r\n" % (i, b"v" * 1000))
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    problem(answer, 431)


async def test_more_than_max_headers_fields_is_431(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    answer = await exchange(port, b"GET /x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert "100" in str(problem(answer, 431)["detail"])


async def test_one_header_longer_than_the_total_is_431(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    answer = await exchange(
        port, b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n"
    )
    problem(answer, 431)


async def test_a_request_target_over_8_kib_is_414(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    answer = await exchange(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    problem(answer, 414)


async def test_headers_just_under_the_limits_pass(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(90))  # ~10 KB, 92 fields
    answer = await exchange(
        port,
        b"GET /"
        + b"a" * 8000
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + headers
        + b"\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")


# --- parser rejections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer SECRET-TOKEN\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer SECRET-TOKEN\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: SECRET-TOKEN\r\n\r\n",
        b"SECRET-TOKEN\x00\x01\x02\r\n\r\n",
    ],
    ids=["bad-char-in-target", "conflicting-framing", "bad-header-name", "not-http"],
)
async def test_parser_rejections_are_problem_json_without_echo(
    serve: Serve, request_bytes: bytes
) -> None:
    _, port, _ = await serve(ROUTES)
    answer = await exchange(port, request_bytes)
    problem(answer, 400)
    assert b"SECRET-TOKEN" not in answer
    assert b"aiohttp" not in answer


async def test_parser_rejections_are_counted_and_access_logged(serve: Serve) -> None:
    lines = Lines()
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(lines)
    try:
        gateway, port, _ = await serve(ROUTES)
        await exchange(port, b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: len(lines.records) == 1)
    finally:
        access_logger.removeHandler(lines)
    assert lines.records[0]["status"] == 400
    assert lines.records[0]["route"] is None
    metrics = gateway.metrics.render().decode()
    assert 'gateway_requests_total{method="OTHER",route="none",status_class="4xx"} 1.0' in metrics


async def test_http_2_0_request_line_is_505_with_an_http_1_1_status_line(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    problem(await exchange(port, b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n"), 505)


async def test_a_version_less_request_line_is_400_not_http_0_9(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    problem(await exchange(port, b"GET /x\r\n\r\n"), 400)


async def test_connect_is_400(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    problem(
        await exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n"), 400
    )


async def test_an_absolute_form_target_without_a_path_is_routed_as_slash(serve: Serve) -> None:
    _, port, _ = await serve(ROUTES)
    answer = await exchange(
        port, b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
    )
    line, _, body = parse(answer)
    assert line.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["path_qs"] == "/"
