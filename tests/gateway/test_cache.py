"""The response cache through a real gateway and a real upstream that counts what reaches it
(CONTRACT §10): hits, what is never stored, keys, Vary, writes, coalescing, 304, no-cache,
stale_if_error, the size cap, restarts, a corrupt file and the admin purge."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import tracemalloc
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.runtime.state import Gateway
from gateway.servers.admin import create_admin_app
from tests.cache_upstream import CountingUpstream
from tests.gateway.conftest import GatewayClient, GatewayTestServer, compile_gateway
from tests.polling import eventually

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
ROUTES = """
version: 1
store: {{cache_dir: "{dir}"}}
auth:
  api_keys:
    - {{consumer: alice, key_sha256: {a}}}
    - {{consumer: bob, key_sha256: {b}}}
services:
  up: {{targets: [$UP]}}
routes:
  - prefix: /c
    service: up
    cache: {{ttl: 60s, stale_if_error: 1m, max_object_bytes: 1048576}}
  - prefix: /mine
    service: up
    auth: {{any_of: [api_key]}}
    cache: {{ttl: 60s, key_by: [consumer]}}
  - prefix: /plain
    service: up
"""


@pytest.fixture
def upstream() -> CountingUpstream:
    return CountingUpstream()


@pytest.fixture
async def up_server(aiohttp_server: AiohttpServer, upstream: CountingUpstream) -> TestServer:
    return await aiohttp_server(upstream.app())


def routes_text(cache_dir: Path) -> str:
    sha = [hashlib.sha256(k.encode()).hexdigest() for k in (KEY_A, KEY_B)]
    return ROUTES.format(dir=cache_dir, a=sha[0], b=sha[1])


async def start(aiohttp_client: AiohttpClient, cache_dir: Path, up: TestServer) -> GatewayClient:
    gateway = compile_gateway(routes_text(cache_dir), up=up)
    client: object = await aiohttp_client(GatewayTestServer(gateway))
    return cast(GatewayClient, client)


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer
) -> GatewayClient:
    return await start(aiohttp_client, tmp_path / "cache", up_server)


async def get(
    client: GatewayClient, path: str, **headers: str
) -> tuple[int, str, CIMultiDict[str]]:
    async with client.get(path, headers=headers) as resp:
        return resp.status, await resp.text(), CIMultiDict(resp.headers)


async def test_a_hit_never_reaches_the_upstream_and_carries_x_cache_and_age(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    status, first, headers = await get(client, "/c/items?x=1")
    assert (status, headers["X-Cache"]) == (200, "MISS")
    for _ in range(3):
        status, again, headers = await get(client, "/c/items?x=1")
        assert (status, again, headers["X-Cache"]) == (200, first, "HIT")
        assert int(headers["Age"]) >= 0
        assert headers["Content-Type"] == "application/json; charset=utf-8"
    async with client.head("/c/items?x=1") as resp:
        assert (resp.status, resp.headers["X-Cache"], await resp.read()) == (200, "HIT", b"")
        assert resp.headers["Content-Length"] == str(len(first))
    assert upstream.count("/c/items?x=1") == 1
    assert upstream.count("/c/items?x=1", "HEAD") == 0


async def test_head_misses_carry_x_cache_and_routes_without_cache_have_none(
    client: GatewayClient,
) -> None:
    async with client.head("/c/only-head") as resp:
        assert resp.headers["X-Cache"] == "MISS"
    _, _, headers = await get(client, "/plain/x")
    assert "X-Cache" not in headers


@pytest.mark.parametrize(
    "cc", ["private", "no-store", "no-cache", "max-age=0", "max-age=60,private"]
)
async def test_private_no_store_and_no_cache_responses_are_never_stored(
    client: GatewayClient, upstream: CountingUpstream, cc: str
) -> None:
    path = f"/c/secret?cc={cc}"
    for _ in range(3):
        _, _, headers = await get(client, path)
        assert headers["X-Cache"] == "MISS"
    assert upstream.count(path) == 3


@pytest.mark.parametrize("status", [500, 302, 201])
async def test_statuses_outside_the_cacheable_set_are_never_stored(
    client: GatewayClient, upstream: CountingUpstream, status: int
) -> None:
    path = f"/c/s?status={status}"
    await get(client, path)
    await get(client, path)
    assert upstream.count(path) == 2


async def test_a_cacheable_404_is_stored(client: GatewayClient, upstream: CountingUpstream) -> None:
    await get(client, "/c/gone?status=404")
    status, _, headers = await get(client, "/c/gone?status=404")
    assert (status, headers["X-Cache"]) == (404, "HIT")
    assert upstream.count("/c/gone?status=404") == 1


@pytest.mark.parametrize("credential", [{"Authorization": "Bearer t"}, {"Cookie": "s=1"}])
async def test_requests_with_credentials_never_share_an_entry(
    client: GatewayClient, upstream: CountingUpstream, credential: dict[str, str]
) -> None:
    await get(client, "/c/shared")  # stored for anonymous clients
    for _ in range(2):
        _, body, headers = await get(client, "/c/shared", **credential)
        assert headers["X-Cache"] == "BYPASS"
    assert upstream.count("/c/shared") == 3  # never answered from, nor stored as, the entry
    _, body, headers = await get(client, "/c/shared")
    assert (headers["X-Cache"], json.loads(body)["n"]) == ("HIT", 1)


async def test_two_consumers_never_see_each_others_entry(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    seen: dict[str, list[tuple[str, str]]] = {}
    for key in (KEY_A, KEY_B, KEY_A, KEY_B):
        _, body, headers = await get(client, "/mine/profile", **{"X-API-Key": key})
        seen.setdefault(key, []).append((json.loads(body)["consumer"], headers["X-Cache"]))
    assert seen[KEY_A] == [("alice", "MISS"), ("alice", "HIT")]
    assert seen[KEY_B] == [("bob", "MISS"), ("bob", "HIT")]
    assert upstream.count("/mine/profile") == 2


async def test_vary_accept_keeps_variants_apart(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/doc?vary=Accept"
    answers = []
    for accept in ("application/json", "text/csv", "application/json", "text/csv"):
        _, body, headers = await get(client, path, Accept=accept)
        answers.append((json.loads(body)["accept"], headers["X-Cache"]))
    assert answers == [
        ("application/json", "MISS"),
        ("text/csv", "MISS"),
        ("application/json", "HIT"),
        ("text/csv", "HIT"),
    ]
    assert upstream.count(path) == 2


async def test_vary_star_is_never_stored(client: GatewayClient, upstream: CountingUpstream) -> None:
    await get(client, "/c/any?vary=*")
    await get(client, "/c/any?vary=*")
    assert upstream.count("/c/any?vary=*") == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_successful_write_drops_the_path_and_its_parent_collection(
    client: GatewayClient, upstream: CountingUpstream, method: str
) -> None:
    for path in ("/c/devices/7", "/c/devices", "/c/devices?page=2", "/c/rooms"):
        await get(client, path)
    async with client.request(method, "/c/devices/7", json={}) as resp:
        assert (resp.status, resp.headers["X-Cache"]) == (200, "BYPASS")
    results = {p: (await get(client, p))[2]["X-Cache"] for p in ("/c/devices/7", "/c/devices")}
    assert results == {"/c/devices/7": "MISS", "/c/devices": "MISS"}
    assert (await get(client, "/c/devices?page=2"))[2]["X-Cache"] == "MISS"  # any query
    assert (await get(client, "/c/rooms"))[2]["X-Cache"] == "HIT"  # elsewhere: kept


async def test_a_failed_write_drops_nothing(client: GatewayClient) -> None:
    await get(client, "/c/devices")
    async with client.post("/c/devices?status=400", json={}) as resp:
        assert resp.status == 400
    assert (await get(client, "/c/devices"))[2]["X-Cache"] == "HIT"


async def test_a_write_through_a_route_without_cache_still_drops_the_entries(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer
) -> None:
    extra = "  - prefix: /c/w\n    service: up\n"  # not cached; its parent /c is
    text = routes_text(tmp_path / "cache").replace(
        "  - prefix: /plain\n", extra + "  - prefix: /plain\n"
    )
    gateway = compile_gateway(text, up=up_server)
    client = cast(GatewayClient, await aiohttp_client(GatewayTestServer(gateway)))
    await get(client, "/c")
    assert (await get(client, "/c"))[2]["X-Cache"] == "HIT"
    async with client.post("/c/w", json={}) as resp:
        assert (resp.status, resp.headers.get("X-Cache")) == (200, None)
    assert (await get(client, "/c"))[2]["X-Cache"] == "MISS"


async def test_fifty_concurrent_misses_make_one_upstream_request(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/slow?delay=0.3"
    answers = await asyncio.gather(*(get(client, path) for _ in range(50)))
    assert upstream.count(path) == 1
    assert {body for _, body, _ in answers} == {answers[0][1]}
    assert sorted(h["X-Cache"] for _, _, h in answers).count("MISS") == 1


async def test_waiters_go_upstream_themselves_when_the_leader_gets_no_storable_answer(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/slow-private?delay=0.2&cc=private"
    answers = await asyncio.gather(*(get(client, path) for _ in range(5)))
    assert [status for status, _, _ in answers] == [200] * 5
    assert upstream.count(path) == 5  # nobody got the leader's private answer


async def test_if_none_match_and_if_modified_since_on_a_fresh_entry_are_answered_304(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/tagged?etag=v1"  # the upstream sends ETag: "v1"
    await get(client, path)
    status, body, headers = await get(client, path, **{"If-None-Match": '"v0", W/"v1"'})
    assert (status, body, headers["X-Cache"], headers["ETag"]) == (304, "", "HIT", '"v1"')
    assert "Age" in headers
    status, _, _ = await get(client, path, **{"If-None-Match": '"v2"'})
    assert status == 200
    future = "Sun, 01 Jan 2090 00:00:00 GMT"
    status, _, _ = await get(client, path, **{"If-Modified-Since": future})
    assert status == 304
    status, _, _ = await get(client, path, **{"If-Modified-Since": "Mon, 01 Jan 1990 00:00:00 GMT"})
    assert status == 200
    assert upstream.count(path) == 1


async def test_client_no_cache_revalidates_upstream_and_refreshes_the_entry(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    await get(client, "/c/fresh")
    _, body, headers = await get(client, "/c/fresh", **{"Cache-Control": "no-cache"})
    assert (headers["X-Cache"], json.loads(body)["n"]) == ("MISS", 2)
    _, body, headers = await get(client, "/c/fresh")
    assert (headers["X-Cache"], json.loads(body)["n"]) == ("HIT", 2)  # the refreshed entry
    _, _, headers = await get(client, "/c/fresh", **{"Cache-Control": "no-store"})
    assert headers["X-Cache"] == "BYPASS"
    assert upstream.count("/c/fresh") == 3


async def test_age_counts_from_the_upstreams_age_and_max_age_is_obeyed(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/old?cc=max-age=100&age=40"
    await get(client, path)
    _, _, headers = await get(client, path)
    assert headers["X-Cache"] == "HIT"
    assert 40 <= int(headers["Age"]) <= 41


async def test_stale_if_error_answers_from_a_stale_entry_when_the_upstream_fails(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/flaky?cc=max-age=1"
    _, first, _ = await get(client, path)
    upstream.failing = True

    async def stale() -> bool:
        status, body, headers = await get(client, path)
        return headers["X-Cache"] == "STALE" and status == 200 and body == first

    await eventually(stale, within=5.0)
    status, _, headers = await get(client, "/c/never-stored")  # no entry: the failure shows
    assert (status, headers["X-Cache"]) == (503, "MISS")


async def test_stale_if_error_answers_when_the_upstream_is_unreachable(
    aiohttp_client: AiohttpClient, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    upstream = CountingUpstream()
    server = await aiohttp_server(upstream.app())
    client = await start(aiohttp_client, tmp_path / "cache", server)
    _, first, _ = await get(client, "/c/x?cc=max-age=1")
    await server.close()

    async def stale() -> bool:
        status, body, headers = await get(client, "/c/x?cc=max-age=1")
        return (status, body, headers["X-Cache"]) == (200, first, "STALE")

    await eventually(stale, within=5.0)


async def test_a_body_over_max_object_bytes_streams_through_uncached_with_bounded_memory(
    client: GatewayClient, upstream: CountingUpstream
) -> None:
    path = "/c/big?mib=5"
    tracemalloc.start()
    try:
        for _ in range(2):
            async with client.get(path) as resp:
                assert resp.headers["X-Cache"] == "MISS"
                total = 0
                async for chunk in resp.content.iter_chunked(65536):
                    total += len(chunk)
                assert total == 5 * 2**20
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert upstream.count(path) == 2
    assert peak < 3 * 2**20, f"peak {peak} bytes: the 5 MiB body was held"


async def test_entries_survive_a_restart_with_their_age_and_expired_ones_are_dropped(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer, upstream: CountingUpstream
) -> None:
    cache_dir = tmp_path / "cache"
    first = await start(aiohttp_client, cache_dir, up_server)
    await get(first, "/c/kept?age=30")
    await get(first, "/c/brief?cc=max-age=31&age=30")  # one second to live
    stored = time.time()
    await first.close()  # the gateway closes its store

    await eventually(lambda: time.time() > stored + 1.2, within=3.0)
    second = await start(aiohttp_client, cache_dir, up_server)
    _, _, headers = await get(second, "/c/kept?age=30")
    assert headers["X-Cache"] == "HIT"
    assert int(headers["Age"]) >= 31  # 30 when stored, and the time since
    _, _, headers = await get(second, "/c/brief?cc=max-age=31&age=30")
    assert headers["X-Cache"] == "MISS"
    assert upstream.count("/c/kept?age=30") == 1


async def test_an_entry_invalidated_before_a_restart_stays_gone_after_it(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer
) -> None:
    cache_dir = tmp_path / "cache"
    first = await start(aiohttp_client, cache_dir, up_server)
    await get(first, "/c/devices/1")
    await get(first, "/c/devices/2")
    async with first.delete("/c/devices/1") as resp:
        assert resp.status == 200
    await first.close()
    second = await start(aiohttp_client, cache_dir, up_server)
    assert (await get(second, "/c/devices/1"))[2]["X-Cache"] == "MISS"
    assert (await get(second, "/c/devices/2"))[2]["X-Cache"] == "HIT"


@pytest.mark.parametrize("garbage", [b"not a database at all" * 100, b""])
async def test_a_corrupt_cache_file_is_moved_aside_and_the_gateway_still_serves(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer, garbage: bytes
) -> None:
    cache_dir = tmp_path / "cache"
    await asyncio.to_thread(cache_dir.mkdir)
    await asyncio.to_thread((cache_dir / "responses.sqlite3").write_bytes, garbage)
    client = await start(aiohttp_client, cache_dir, up_server)
    assert (await get(client, "/c/a"))[2]["X-Cache"] == "MISS"
    assert (await get(client, "/c/a"))[2]["X-Cache"] == "HIT"
    if garbage:
        aside = await asyncio.to_thread(lambda: [p.name for p in cache_dir.glob("*.corrupt-*")])
        assert [name.split(".corrupt-")[0] for name in aside] == ["responses.sqlite3"]


async def test_a_cache_file_of_another_format_is_replaced(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer
) -> None:
    import pickle
    import shelve

    from sqlshelf import SqliteMapping

    cache_dir = tmp_path / "cache"

    def old_format() -> None:
        cache_dir.mkdir()
        db = SqliteMapping(cache_dir / "responses.sqlite3")
        shelf: shelve.Shelf[object] = shelve.Shelf(db, protocol=pickle.HIGHEST_PROTOCOL)
        shelf["\x01format"] = 0
        shelf.close()

    await asyncio.to_thread(old_format)
    client = await start(aiohttp_client, cache_dir, up_server)
    assert (await get(client, "/c/a"))[2]["X-Cache"] == "MISS"
    assert (await get(client, "/c/a"))[2]["X-Cache"] == "HIT"
    assert await asyncio.to_thread(lambda: list(cache_dir.glob("responses.sqlite3.corrupt-*")))


async def test_admin_purge_drops_a_prefix_by_segment(
    client: GatewayClient, aiohttp_client: AiohttpClient
) -> None:
    for path in ("/c/a", "/c/a/b", "/c/ab"):
        await get(client, path)
    gateway = cast(GatewayTestServer, client.server).gateway
    admin = await aiohttp_client(create_admin_app(gateway))
    async with admin.post("/cache/purge", json={"prefix": "/c/a"}) as resp:
        assert (resp.status, await resp.json()) == (200, {"prefix": "/c/a", "purged": 2})
    assert [(await get(client, p))[2]["X-Cache"] for p in ("/c/a", "/c/a/b", "/c/ab")] == [
        "MISS",
        "MISS",
        "HIT",
    ]
    async with admin.post("/cache/purge", json={"prefix": "c"}) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"


async def test_metrics_count_hits_misses_bypasses_stale_and_stored_bytes(
    client: GatewayClient, aiohttp_client: AiohttpClient
) -> None:
    await get(client, "/c/m")
    await get(client, "/c/m")
    await get(client, "/c/m", Authorization="Bearer x")
    gateway = cast(GatewayTestServer, client.server).gateway
    admin = await aiohttp_client(create_admin_app(gateway))
    async with admin.get("/metrics") as resp:
        text = await resp.text()
    for result in ("hit", "miss", "bypass"):
        assert f'gateway_cache_lookups_total{{result="{result}",route="routes.0"}} 1.0' in text
    stored = [x for x in text.splitlines() if x.startswith("gateway_cache_stored_bytes")]
    assert stored
    assert float(stored[0].split()[-1]) > 0
    assert "gateway_cache_evictions_total 0.0" in text


async def test_the_route_table_lists_the_cache_stage(client: GatewayClient) -> None:
    gateway: Gateway = cast(GatewayTestServer, client.server).gateway
    stages = {r.config.prefix: r.stages for r in gateway.table.routes}
    assert stages["/c"][-2:] == ("cache", "forward")
    assert "cache" not in stages["/plain"]


async def test_clients_that_close_at_their_last_byte_still_leave_one_entry(
    aiohttp_client: AiohttpClient, tmp_path: Path, up_server: TestServer, upstream: CountingUpstream
) -> None:
    """The entry is written as the body ends; a client that closes then cancels its handler
    (handler_cancellation, as in production), which must not cancel the write, nor leave the
    waiters without it."""
    gateway = compile_gateway(routes_text(tmp_path / "cache"), up=up_server)
    server = GatewayTestServer(gateway, handler_cancellation=True)
    client = cast(GatewayClient, await aiohttp_client(server))
    path = "/c/closing?delay=0.3"
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.get(client.make_url(path)) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(one() for _ in range(50))) == [200] * 50
    assert upstream.count(path) == 1
