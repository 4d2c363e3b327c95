"""The benchmark's baseline: the least a correct aiohttp streaming proxy does, and no more.

One shared ClientSession, a catch-all handler, hop-by-hop headers (and Host) dropped, bodies
streamed both ways in 64 KiB chunks and never decompressed, uvloop when installed. What the
gateway costs on top of this is what its features cost.
Usage: python bench/baseline.py --listen HOST:PORT --upstream http://HOST:PORT
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping
from typing import Final

import aiohttp
from aiohttp import web

HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection"}
    | {"te", "trailer", "transfer-encoding", "upgrade"}
)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: Final = web.AppKey("upstream", str)


def kept(headers: Mapping[str, str], drop: frozenset[str]) -> list[tuple[str, str]]:
    """The headers minus `drop` and minus whatever names the Connection header lists."""
    listed = {n.strip().lower() for n in headers.get("Connection", "").split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop and k.lower() not in listed]


async def proxy(request: web.Request) -> web.StreamResponse:
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.raw_path,
        headers=kept(request.headers, HOP_BY_HOP | {"host"}),
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(kept(upstream.headers, HOP_BY_HOP))
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(65536):
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)  # streams run long
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=timeout
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description="minimal aiohttp streaming proxy")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT, no trailing slash")
    args = parser.parse_args()
    app = web.Application(client_max_size=2**40)
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = None
    web.run_app(
        app, host=host, port=int(port), access_log=None, print=None, backlog=1024, loop=loop
    )


if __name__ == "__main__":
    main()
