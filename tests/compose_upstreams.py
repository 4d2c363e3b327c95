"""Upstreams for aggregate and compose tests: JSON answers that say what they saw, after an
optional delay, and failures on demand (a status, HTML, a body too big, 503 once)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Final

from aiohttp import web

SEEN: Final = web.AppKey("seen", list)  # every request: (method, path_qs, headers, body)
HITS: Final = web.AppKey("hits", Counter)  # requests per path


async def answer(request: web.Request) -> web.StreamResponse:
    """`/json/NAME?ms=N`: after N ms, what the request looked like, as JSON."""
    body = await request.read()
    request.app[SEEN].append((request.method, request.raw_path, dict(request.headers), body))
    request.app[HITS][request.path] += 1
    delay = int(request.query.get("ms", "0")) / 1000
    if delay:
        await asyncio.sleep(delay)
    seen = {
        "name": request.match_info.get("name", ""),
        "method": request.method,
        "path_qs": request.raw_path,
        "headers": dict(request.headers),
        "body": body.decode(errors="replace"),
    }
    return web.json_response(seen)


async def status(request: web.Request) -> web.Response:
    request.app[HITS][request.path] += 1
    code = int(request.match_info["code"])
    return web.json_response({"status": code}, status=code)


async def html(request: web.Request) -> web.Response:
    return web.Response(text="<html>not json</html>", content_type="text/html")


async def big(request: web.Request) -> web.Response:
    size = int(request.query.get("bytes", "2000000"))
    return web.Response(body=json.dumps("x" * size).encode(), content_type="application/json")


async def flaky(request: web.Request) -> web.Response:
    """503 on the first request to each path, 200 after: a retry is visible."""
    await request.read()
    request.app[HITS][request.path] += 1
    if request.app[HITS][request.path] == 1:
        return web.json_response({"busy": True}, status=503)
    return web.json_response({"hits": request.app[HITS][request.path]})


def make_parts_app() -> web.Application:
    app = web.Application()
    app[SEEN] = []
    app[HITS] = Counter()
    app.router.add_route("*", "/json/{name}", answer)
    app.router.add_route("*", "/json/{name}/{more:.*}", answer)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/html", html)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/flaky/{key}", flaky)
    return app
