"""An upstream for cache tests that counts what reaches it and answers as the query says:
`cc=` Cache-Control, `vary=` Vary (the body then names the Accept it saw), `etag=` (quoted
here), `age=`, `status=`, `mib=` a streamed body of that many MiB, `delay=` seconds to wait.
`failing = True` makes every answer a 503."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from aiohttp import web


class CountingUpstream:
    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()  # "METHOD path?query" -> requests that arrived
        self.failing = False

    def count(self, path_qs: str, method: str = "GET") -> int:
        return self.seen[f"{method} {path_qs}"]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen[f"{request.method} {request.path_qs}"] += 1
        n = self.seen[f"{request.method} {request.path_qs}"]
        if self.failing:
            return web.Response(status=503, text="down")
        q = request.query
        if "delay" in q:
            await asyncio.sleep(float(q["delay"]))
        headers = {}
        for key, name in (
            ("cc", "Cache-Control"),
            ("vary", "Vary"),
            ("etag", "ETag"),
            ("age", "Age"),
        ):
            if key in q:
                headers[name] = f'"{q[key]}"' if key == "etag" else q[key]
        if "mib" in q:
            response = web.StreamResponse(headers=headers)
            response.content_length = int(q["mib"]) * 2**20
            await response.prepare(request)
            for _ in range(int(q["mib"]) * 16):
                await response.write(b"x" * 65536)
            await response.write_eof()
            return response
        body = {
            "n": n,
            "method": request.method,
            "path": request.path_qs,
            "accept": request.headers.get("Accept", ""),
            "consumer": request.headers.get("X-Consumer", ""),
        }
        return web.Response(
            status=int(q.get("status", "200")),
            text=json.dumps(body),
            content_type="application/json",
            headers=headers,
        )
