"""A canned upstream for the tracing phase: every request gets the bytes bench/upstream.py's
`GET /small` would (the same JSON body and Content-Type, a Date a second), from an asyncio
Protocol on uvloop, at a fraction of an aiohttp app's CPU per request.

Why: the tracing phase puts the gateway's export process on the load generator's CPU, beside
wrk and the upstream. With the aiohttp upstream there, that CPU was full before the gateway's
was, and the phase measured the load side rather than the gateway. Requests are GETs without
a body (the phase sends nothing else); keep-alive and pipelining work.

Usage: python bench/cannedupstream.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
from email.utils import formatdate
from typing import Any, Final

from upstream import SMALL

END: Final = b"\r\n\r\n"


def answer(date: str) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: %d\r\nDate: %s\r\nServer: bench-canned\r\n\r\n%s"
        % (len(SMALL), date.encode(), SMALL)
    )


class Canned(asyncio.Protocol):
    reply = answer(formatdate(usegmt=True))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's is no asyncio.Transport subclass
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        data = self.pending + data if self.pending else data
        heads = data.count(END)
        if heads:
            self.transport.write(Canned.reply * heads)
        self.pending = data[data.rfind(END) + 4 :] if heads else data


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Canned, host, port, backlog=1024)
    async with server:
        while True:  # the Date header, once a second
            await asyncio.sleep(1)
            Canned.reply = answer(formatdate(usegmt=True))


def main() -> None:
    parser = argparse.ArgumentParser(description="canned benchmark upstream")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop

        uvloop.run(serve(host, int(port)))
    except ImportError:  # pragma: no cover - uvloop is installed with the gateway
        asyncio.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
