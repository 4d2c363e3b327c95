"""The benchmark's upstream: a fast aiohttp app on uvloop that the proxies under test front.

GET /small         a ~100-byte JSON object
GET /64k           a 64 KiB body
GET /stream?bytes=N  N bytes, streamed in 256 KiB chunks (Content-Length set)
POST /sink         reads the body as it streams in, discards it, answers the byte count

Usage: python bench/upstream.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import json
from typing import Final

from aiohttp import web

SMALL: Final = json.dumps(
    {"id": "dev-0042", "kind": "thermostat", "room": "kitchen", "online": True, "temp_c": 21.5},
    separators=(",", ":"),
).encode()
BODY_64K: Final = b"x" * 65536
CHUNK: Final = b"y" * 262144


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="application/json")


async def body_64k(request: web.Request) -> web.Response:
    return web.Response(body=BODY_64K, content_type="application/octet-stream")


async def stream(request: web.Request) -> web.StreamResponse:
    remaining = int(request.query.get("bytes", "1048576"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    view = memoryview(CHUNK)
    while remaining > 0:
        size = min(remaining, len(CHUNK))
        await response.write(view[:size])
        remaining -= size
    await response.write_eof()
    return response


async def sink(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"bytes": received})


def make_app() -> web.Application:
    app = web.Application(client_max_size=2**40)
    app.router.add_get("/small", small)
    app.router.add_get("/64k", body_64k)
    app.router.add_get("/stream", stream)
    app.router.add_post("/sink", sink)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark upstream")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is installed with the gateway
        pass
    web.run_app(
        make_app(), host=host, port=int(port), access_log=None, print=None, backlog=1024, loop=loop
    )


if __name__ == "__main__":
    main()
