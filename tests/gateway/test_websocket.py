"""WebSocket pass-through: messages both ways, close codes, the per-message limit each way, no
compression that could inflate inside the gateway, refused upgrades relayed whole, and a 101
nobody asked for. Hostile peers are raw sockets; friendly ones are aiohttp apps."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.config.build import load_text
from tests.gateway.conftest import ECHO_ROUTE, GatewayClient, MakeGateway
from tests.polling import eventually

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}
LIMIT = 1000
WS_ROUTE = f"""
version: 1
limits: {{max_message_bytes: {LIMIT}}}
services:
  ws: {{targets: [$WS]}}
routes:
  - {{prefix: /, service: ws}}
"""


# --- upstreams ------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the WebSocket upstream received: message sizes, its close codes, plain hits."""

    messages: list[int] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    hits: list[str] = field(default_factory=list)


def make_ws_app(seen: Seen) -> web.Application:
    """/ws echoes every message (and takes any size, so only the gateway can refuse one);
    "send:N" makes it send N bytes. The other paths refuse the upgrade in various ways."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(max_msg_size=0)
        await sock.prepare(request)
        async for message in sock:
            if message.type == web.WSMsgType.TEXT and message.data.startswith("send:"):
                await sock.send_bytes(b"z" * int(message.data[5:]))
            elif message.type == web.WSMsgType.TEXT:
                seen.messages.append(len(message.data))
                await sock.send_str(message.data)
            elif message.type == web.WSMsgType.BINARY:
                seen.messages.append(len(message.data))
                await sock.send_bytes(message.data)
        seen.close_codes.append(sock.close_code)
        return sock

    async def deny(request: web.Request) -> web.Response:
        return web.Response(
            status=401,
            text='{"error": "token expired"}',
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="home", error="invalid_token"'},
        )

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def elsewhere(request: web.Request) -> web.Response:
        seen.hits.append(request.path)
        return web.Response(text="followed")

    async def hop(request: web.Request) -> web.Response:
        headers = {"Connection": "X-Hop", "X-Hop": "secret", "Keep-Alive": "timeout=5"}
        return web.Response(status=403, text="no", headers=headers)

    async def big(request: web.Request) -> web.Response:
        return web.Response(status=403, body=bytes(range(256)) * 4096)  # 1 MiB

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/deny", deny)
    app.router.add_get("/moved", moved)
    app.router.add_get("/elsewhere", elsewhere)
    app.router.add_get("/hop", hop)
    app.router.add_get("/big", big)
    return app


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
async def ws_upstream(aiohttp_server: AiohttpServer, seen: Seen) -> TestServer:
    return await aiohttp_server(make_ws_app(seen))


@pytest.fixture
async def gateway(make_gateway: MakeGateway, ws_upstream: TestServer) -> GatewayClient:
    return await make_gateway(WS_ROUTE, ws=ws_upstream)


Conversation = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Conversation], Awaitable[str]]]:
    """`await raw_upstream(conversation)` -> the URL of a server that runs `conversation` on
    every connection, after reading the request head."""
    servers: list[asyncio.Server] = []

    async def start(conversation: Conversation) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await conversation(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


# --- raw WebSocket framing ------------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One client frame (masked), as RFC 6455 §5.2 lays it out."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(opcode, rsv1, payload) of the next frame, unmasking it if it is masked."""
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4) if second & 0x80 else b""
    payload = await reader.readexactly(n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, bool(first & 0x40), payload


async def close_code_of(reader: asyncio.StreamReader) -> int:
    """Skip to the close frame and return its code."""
    while True:
        opcode, _, payload = await asyncio.wait_for(read_frame(reader), 10)
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


async def raw_upgrade(
    client: GatewayClient, path: str, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A hand-written upgrade through the gateway: (reader, writer, response head)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in UPGRADE.items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{head}{extra}\r\n".encode())
    response = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    assert response.startswith("HTTP/1.1 101"), response
    return reader, writer, response


def deflated_zeros(mib: int) -> bytes:
    """`mib` MiB of zeros as one permessage-deflate payload (RFC 7692 §7.2.1): about 1/1000
    of its inflated size."""
    deflate = zlib.compressobj(wbits=-15)
    chunk = bytes(2**20)
    out = b"".join(deflate.compress(chunk) for _ in range(mib))
    out += deflate.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


async def accept_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a WebSocket upgrade request with a valid 101, as a raw upstream."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    key = next(
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith("sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    writer.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    await writer.drain()


# --- messages and close codes ---------------------------------------------------------------


async def test_websocket_frames_pass_both_ways(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    async with client.ws_connect("/tools/ws", protocols=["chat"]) as ws:
        await ws.send_str("hi")
        text = await ws.receive_str(timeout=5)
        await ws.send_bytes(b"abc")
        data = await ws.receive_bytes(timeout=5)

    assert ws.protocol == "chat"
    assert (text, data) == ("echo:hi", b"cba")


async def test_upstream_websocket_close_reaches_the_client_with_its_code(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)

    async with client.ws_connect("/tools/ws") as ws:
        await ws.send_str("close")
        message = await ws.receive(timeout=5)

    assert message.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4000


# --- the per-message limit ------------------------------------------------------------------


async def test_a_message_of_exactly_the_limit_passes_both_ways(
    gateway: GatewayClient, seen: Seen
) -> None:
    async with gateway.ws_connect("/ws") as ws:
        await ws.send_bytes(b"a" * LIMIT)
        echoed = await ws.receive_bytes(timeout=5)
        await ws.send_str(f"send:{LIMIT}")
        sent = await ws.receive_bytes(timeout=5)

    assert (len(echoed), len(sent)) == (LIMIT, LIMIT)
    assert seen.messages == [LIMIT]


async def test_a_client_message_over_the_limit_closes_it_with_1009_and_never_reaches_upstream(
    gateway: GatewayClient, seen: Seen
) -> None:
    async with gateway.ws_connect("/ws") as ws:
        await ws.send_bytes(b"a" * (LIMIT + 1))
        message = await ws.receive(timeout=5)

    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await eventually(lambda: seen.close_codes == [aiohttp.WSCloseCode.GOING_AWAY])
    assert seen.messages == []


async def test_fragments_adding_up_past_the_limit_close_with_1009(
    gateway: GatewayClient, seen: Seen
) -> None:
    reader, writer, _ = await raw_upgrade(gateway, "/ws")
    half = b"f" * (LIMIT // 2 + 1)
    writer.write(frame(0x2, half, fin=False) + frame(0x0, half, fin=True))

    assert await close_code_of(reader) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    writer.close()
    await eventually(lambda: seen.close_codes == [aiohttp.WSCloseCode.GOING_AWAY])
    assert seen.messages == []


async def test_an_upstream_message_over_the_limit_closes_it_with_1009_and_the_client_with_1014(
    gateway: GatewayClient, seen: Seen
) -> None:
    async with gateway.ws_connect("/ws") as ws:
        await ws.send_str(f"send:{LIMIT + 1}")
        message = await ws.receive(timeout=5)

    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.BAD_GATEWAY
    await eventually(lambda: seen.close_codes == [aiohttp.WSCloseCode.MESSAGE_TOO_BIG])


async def test_the_default_limit_is_one_mebibyte(make_gateway: MakeGateway) -> None:
    client = await make_gateway(ECHO_ROUTE)

    async with client.ws_connect("/tools/ws") as ws:
        await ws.send_bytes(b"m" * 2**20)
        echoed = await ws.receive_bytes(timeout=5)
        await ws.send_bytes(b"m" * (2**20 + 1))
        message = await ws.receive(timeout=5)

    assert len(echoed) == 2**20
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ("", 2**20),
        ("limits: {max_message_bytes: 4096}\n", 4096),
    ],
)
def test_max_message_bytes_is_read_from_limits(limits: str, expected: int) -> None:
    text = f"version: 1\n{limits}services:\n  s: {{targets: [http://h:1]}}\n"
    result = load_text(text + "routes:\n  - {prefix: /, service: s}\n", "routes.yaml", {})

    assert result.config is not None
    assert result.config.max_message_bytes == expected


def test_a_max_message_bytes_below_one_is_rejected_at_its_position() -> None:
    text = "version: 1\nlimits: {max_message_bytes: 0}\nservices:\n  s: {targets: [http://h:1]}\n"
    result = load_text(text + "routes:\n  - {prefix: /, service: s}\n", "routes.yaml", {})

    assert result.config is None
    assert next(str(e) for e in result.errors).startswith(
        "routes.yaml:2:29: limits.max_message_bytes:"
    )


# --- compression ----------------------------------------------------------------------------


async def test_a_deflate_offer_is_declined_and_a_compressed_frame_is_a_protocol_error(
    gateway: GatewayClient, seen: Seen
) -> None:
    bomb = deflated_zeros(64)  # 64 MiB once inflated
    assert len(bomb) < 2**17

    reader, writer, head = await raw_upgrade(
        gateway, "/ws", "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    )
    assert "sec-websocket-extensions" not in head.lower()
    writer.write(frame(0x2, bomb, rsv1=True))

    code = await close_code_of(reader)
    writer.close()
    assert code in (aiohttp.WSCloseCode.PROTOCOL_ERROR, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    await eventually(lambda: seen.close_codes == [aiohttp.WSCloseCode.GOING_AWAY])
    assert seen.messages == []


async def test_a_client_offering_compression_still_talks_uncompressed(
    gateway: GatewayClient, seen: Seen
) -> None:
    async with gateway.ws_connect("/ws", compress=15) as ws:
        await ws.send_str("plain")
        echoed = await ws.receive_str(timeout=5)

    assert ws.compress == 0
    assert echoed == "plain"


async def test_a_compressed_frame_from_the_upstream_closes_both_sides(
    make_gateway: MakeGateway, raw_upstream: Callable[[Conversation], Awaitable[str]]
) -> None:
    upstream_close: list[int] = []

    async def deflating(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        payload = deflated_zeros(64)  # server frames are not masked
        writer.write(bytes([0xC2, 127]) + len(payload).to_bytes(8, "big") + payload)
        upstream_close.append(await close_code_of(reader))

    url = await raw_upstream(deflating)
    client = await make_gateway(WS_ROUTE.replace("$WS", url))

    async with client.ws_connect("/ws") as ws:
        message = await ws.receive(timeout=5)

    assert message.data == aiohttp.WSCloseCode.BAD_GATEWAY
    await eventually(lambda: upstream_close == [aiohttp.WSCloseCode.PROTOCOL_ERROR])


# --- refused upgrades -----------------------------------------------------------------------


async def test_a_refused_websocket_upgrade_relays_the_status_and_spares_the_circuit(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(ECHO_ROUTE)

    statuses = []
    for _ in range(6):  # more than the breaker's 5 failures
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/tools/no-such-socket")
        statuses.append(refused.value.status)

    assert statuses == [404] * 6
    assert (await client.get("/tools/gzip")).status == 200  # the target was not ejected


async def test_a_refused_upgrade_keeps_its_www_authenticate_and_body(
    gateway: GatewayClient,
) -> None:
    resp = await gateway.get("/deny", headers=UPGRADE)

    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="home", error="invalid_token"'
    assert resp.content_type == "application/json"
    assert await resp.read() == b'{"error": "token expired"}'


async def test_a_redirected_upgrade_relays_the_location_and_is_not_followed(
    gateway: GatewayClient, seen: Seen
) -> None:
    resp = await gateway.get("/moved", headers=UPGRADE, allow_redirects=False)

    assert resp.status == 302
    assert resp.headers["Location"] == "/elsewhere"
    assert seen.hits == []


async def test_a_refused_upgrade_loses_its_hop_by_hop_headers(gateway: GatewayClient) -> None:
    resp = await gateway.get("/hop", headers=UPGRADE)

    assert resp.status == 403
    assert {"X-Hop", "Keep-Alive"}.isdisjoint(resp.headers)
    assert await resp.read() == b"no"


async def test_a_refusal_with_a_large_body_arrives_whole(gateway: GatewayClient) -> None:
    resp = await gateway.get("/big", headers=UPGRADE)

    assert resp.status == 403
    assert await resp.read() == bytes(range(256)) * 4096


async def test_a_101_without_a_valid_accept_is_a_502(
    make_gateway: MakeGateway, raw_upstream: Callable[[Conversation], Awaitable[str]]
) -> None:
    async def wrong_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    url = await raw_upstream(wrong_accept)
    client = await make_gateway(WS_ROUTE.replace("$WS", url))

    resp = await client.get("/ws", headers=UPGRADE)

    assert resp.status == 502
    body = await resp.json(content_type=None)
    assert body["detail"] == "service 'ws' answered the upgrade with an invalid handshake"


# --- 1xx on plain requests ------------------------------------------------------------------


async def test_a_101_to_a_request_that_asked_for_no_upgrade_is_a_502(
    make_gateway: MakeGateway, raw_upstream: Callable[[Conversation], Awaitable[str]]
) -> None:
    async def switching(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        )
        writer.write(b"\x00\x01\x02 anything at all")
        await writer.drain()
        await reader.read()

    url = await raw_upstream(switching)
    client = await make_gateway(WS_ROUTE.replace("$WS", url))

    resp = await client.get("/plain")

    assert resp.status == 502
    body = await resp.json(content_type=None)
    assert body["detail"] == "service 'ws' switched protocols unasked"


async def test_an_interim_103_before_the_answer_is_skipped(
    make_gateway: MakeGateway, raw_upstream: Callable[[Conversation], Awaitable[str]]
) -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    url = await raw_upstream(hints)
    client = await make_gateway(WS_ROUTE.replace("$WS", url))

    resp = await client.get("/plain")

    assert resp.status == 200
    assert await resp.read() == b"ok"
