"""Compose handlers that test_compose.py names in its routes (`...compose_handlers:NAME`)."""

from __future__ import annotations

from aiohttp import web

from gateway.actions.compose import ComposeRequest, Context
from gateway.http.pipeline import UpstreamResponse

UNDONE: list[str] = []  # compensations, in the order they ran


async def two_calls(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    one = await ctx.call("a", "GET", "/json/one")
    two = await ctx.call("b", "POST", "/json/two", json={"n": 2}, headers={"X-Extra": "1"})
    return ctx.json(
        200, {"one": one.json, "two": two.json, "consumer": ctx.consumer, "steps": ctx.steps}
    )


async def raises(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    await ctx.call("a", "POST", "/json/first")
    ctx.on_failure(_undo(ctx, "first"))
    raise RuntimeError("secret-detail /etc/passwd")


async def _undo(ctx: Context, name: str) -> None:
    await ctx.call("a", "POST", f"/json/undo-{name}")
    UNDONE.append(name)


async def saga(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    for name in ("s1", "s2"):
        await ctx.call("a", "POST", f"/json/{name}")
        ctx.on_failure(_undo(ctx, name))
    third = await ctx.call("a", "POST", "/status/500")
    if not third.ok:
        ctx.fail(502, "the third step failed", reason="status 500")
    return ctx.json(200, {"steps": ctx.steps})


async def saga_unhandled(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    await ctx.call("a", "POST", "/json/s1")
    ctx.on_failure(lambda: _undo(ctx, "s1"))  # an async callable works as well as a coroutine
    await ctx.call("dead", "POST", "/json/never")  # CallFailed: not handled here
    return ctx.json(200, {})


async def succeeds_with_compensation(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    await ctx.call("a", "POST", "/json/s1")
    ctx.on_failure(_undo(ctx, "s1"))  # not needed: closed, never awaited, no warning
    return ctx.json(201, {"steps": ctx.steps})


async def get_retried(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    got = await ctx.call("pair", "GET", "/json/r")
    return ctx.json(got.status, {"status": got.status})


async def post_flaky(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    key = request.query.get("key")
    got = await ctx.call("flaky", "POST", f"/flaky/{key or 'plain'}", json={}, idempotency_key=key)
    return ctx.json(200, {"status": got.status})


async def echo_request(ctx: Context, request: ComposeRequest) -> web.Response:
    body = await request.json()
    return web.json_response(
        {"method": request.method, "path": request.path, "q": request.query.get("q"), "body": body},
        status=202,
    )


def not_async(ctx: Context, request: ComposeRequest) -> None:
    return None


async def too_slow(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    await ctx.call("a", "POST", "/json/s1")
    ctx.on_failure(_undo(ctx, "s1"))
    await ctx.call("a", "GET", "/json/slow?ms=3000")  # past the route's deadline
    return ctx.json(200, {})
