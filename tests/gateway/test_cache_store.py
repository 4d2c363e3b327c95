"""The cache's storage and decisions without HTTP: shelved-cache over the shared SQLite file
(bounds, evictions, stable keys, two workers' views, a store after a drop), and the RFC 9111
subset in gateway/cache/policy.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from multidict import CIMultiDict

from gateway.cache import policy, store
from gateway.cache.store import CacheFile, CacheStore, path_prefixes, subtree_prefixes
from gateway.config.model import CachePolicy, CacheStoreConfig

RULE = CachePolicy(ttl=60.0, stale_if_error=30.0)


def entry(body: bytes = b"x", lifetime: float = 60.0, now: float | None = None) -> policy.Entry:
    now = time.time() if now is None else now
    fresh = policy.Freshness(lifetime, 0.0)
    return policy.make_entry(200, "OK", [("ETag", '"1"')], {}, body, fresh, RULE, now)


def rows(f: CacheFile) -> int:
    """Entries in the file (the meta rows left out)."""
    return sum(1 for key in f.db if key.startswith(b"/"))


def put(f: CacheFile, path: str, body: bytes = b"x", gen: int | None = None) -> bool:
    generation = f.lookup(path, (path,), {}).generation if gen is None else gen
    return f.put(path, (path,), (), {}, entry(body), generation)


def test_the_lru_evicts_past_max_entries_and_deletes_the_rows_too(tmp_path: Path) -> None:
    f = CacheFile(tmp_path, CacheStoreConfig(max_entries=3))
    for i in range(5):
        assert put(f, f"/a/{i}")
    assert f.evictions == 2
    assert [f.lookup(f"/a/{i}", (f"/a/{i}",), {}).entry is not None for i in range(5)] == [
        False, False, True, True, True,
    ]  # fmt: skip
    assert rows(f) == 3
    f.close()


def test_max_bytes_bounds_what_a_worker_holds(tmp_path: Path) -> None:
    f = CacheFile(tmp_path, CacheStoreConfig(max_bytes=3000))
    for i in range(5):
        put(f, f"/b/{i}", b"y" * 900)
    assert f.stored_bytes() <= 3000
    assert f.evictions >= 2
    assert not put(f, "/b/huge", b"z" * 4000)  # never fits: not stored at all
    f.close()


def test_keys_are_stable_digests_so_another_process_finds_the_entry(tmp_path: Path) -> None:
    one = CacheFile(tmp_path, CacheStoreConfig())
    put(one, "/k")
    one.close()
    again = CacheFile(tmp_path, CacheStoreConfig())
    found = again.lookup("/k", ("/k",), {})
    assert found.entry is not None
    assert found.key == policy.digest("/k", ("/k",))
    assert found.key.startswith("/k\x00")
    again.close()


def test_a_drop_by_one_worker_is_seen_by_another_that_held_the_entry_in_memory(
    tmp_path: Path,
) -> None:
    a = CacheFile(tmp_path, CacheStoreConfig())
    b = CacheFile(tmp_path, CacheStoreConfig())
    put(a, "/d/7")
    assert b.lookup("/d/7", ("/d/7",), {}).entry is not None  # now in b's memory too
    assert a.drop(path_prefixes(["/d/7"])) == 1
    assert b.lookup("/d/7", ("/d/7",), {}).entry is None
    a.close()
    b.close()


def test_a_response_fetched_before_a_drop_is_not_stored_after_it(tmp_path: Path) -> None:
    f = CacheFile(tmp_path, CacheStoreConfig())
    generation = f.lookup("/r", ("/r",), {}).generation
    f.drop(path_prefixes(["/r"]))  # a write while the GET was upstream
    assert not put(f, "/r", gen=generation)
    assert f.lookup("/r", ("/r",), {}).entry is None
    f.close()


def test_an_entry_past_its_stale_window_is_deleted_on_lookup(tmp_path: Path) -> None:
    f = CacheFile(tmp_path, CacheStoreConfig())
    old = entry(lifetime=1.0, now=time.time() - 100)  # fresh 1 s, stale 30 s more: long gone
    f.put("/o", ("/o",), (), {}, old, f.lookup("/o", ("/o",), {}).generation)
    assert f.lookup("/o", ("/o",), {}).entry is None
    assert rows(f) == 0
    f.close()


def test_a_file_with_more_rows_than_max_entries_is_trimmed_on_open(tmp_path: Path) -> None:
    f = CacheFile(tmp_path, CacheStoreConfig(max_entries=10))
    for i in range(10):
        put(f, f"/t/{i}")
    f.close()
    smaller = CacheFile(tmp_path, CacheStoreConfig(max_entries=4))
    assert rows(smaller) == 4
    smaller.close()


@contextmanager
def thread_busy(s: CacheStore) -> Iterator[None]:
    """The store's one thread held by another job: a lookup that completes meanwhile was
    answered on the loop, from the hot map."""
    gate = threading.Lock()
    assert gate.acquire(blocking=False)
    s._executor.submit(gate.acquire)
    try:
        yield
    finally:
        gate.release()


async def test_a_hot_hit_is_a_miss_right_after_a_write_through_another_workers_file(
    tmp_path: Path,
) -> None:
    config = CacheStoreConfig(directory=str(tmp_path))
    a, b = CacheStore(config), CacheStore(config)
    headers = {"accept": "application/json"}
    generation = (await a.lookup("/h", ("/h",), headers)).generation
    assert await a.put("/h", ("/h",), ("accept",), headers, entry(b"v"), generation)
    assert await a.put("/p", ("/p",), (), {}, entry(b"w"), generation)
    assert (await a.lookup("/p", ("/p",), {})).entry is not None  # hot from the put
    with thread_busy(a):
        hot = await asyncio.wait_for(a.lookup("/h", ("/h",), headers), 5)
        assert hot.entry is not None
        assert hot.entry.body == b"v"
        assert hot.key == policy.digest("/h", ("/h", "accept=application/json"))
        assert (await asyncio.wait_for(a.lookup("/p", ("/p",), {}), 5)).entry is not None
    assert await b.drop_paths(["/h"]) >= 1  # the write went through the other worker
    assert (await a.lookup("/h", ("/h",), headers)).entry is None
    found = await a.lookup("/p", ("/p",), {})  # not dropped: read again, hot again
    assert found.entry is not None
    assert found.generation == generation + 1
    with thread_busy(a):
        assert (await asyncio.wait_for(a.lookup("/p", ("/p",), {}), 5)).entry is not None
    await a.close()
    await b.close()


async def test_the_hot_map_is_bounded_by_entries_and_drops_the_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = CacheStore(CacheStoreConfig(directory=str(tmp_path / "a"), max_entries=5))
    monkeypatch.setattr(store, "HOT_ENTRIES", 3)  # below max_entries here: the cap applies
    capped = CacheStore(CacheStoreConfig(directory=str(tmp_path / "b"), max_entries=50))
    for s, bound in ((small, 5), (capped, 3)):
        generation = (await s.lookup("/x", ("/x",), {})).generation
        for i in range(8):
            assert await s.put(f"/x/{i}", (f"/x/{i}",), (), {}, entry(), generation)
        assert s.hot_count() == bound
        with thread_busy(s):
            newest = await asyncio.wait_for(s.lookup("/x/7", ("/x/7",), {}), 5)
            assert newest.entry is not None
            oldest = asyncio.ensure_future(s.lookup("/x/0", ("/x/0",), {}))
            await asyncio.sleep(0)  # a hot answer completes in the task's first step
            assert not oldest.done()  # not hot: it waits for the thread
        await oldest
        await s.close()


def test_path_and_subtree_prefixes_respect_segments() -> None:
    assert path_prefixes(["/a/b/"]) == [b"/a/b\x00", b"/a/b/\x00"]
    assert subtree_prefixes("/a") == [b"/a\x00", b"/a/"]
    assert subtree_prefixes("/") == [b"/"]


@pytest.mark.parametrize(
    ("path", "dropped"),
    [
        ("/api/inventory/devices/7", ("/api/inventory/devices/7", "/api/inventory/devices")),
        ("/devices", ("/devices", "/")),
        ("/devices/", ("/devices", "/")),
        ("/", ("/",)),
    ],
)
def test_a_write_drops_the_path_and_its_parent(path: str, dropped: tuple[str, ...]) -> None:
    assert policy.invalidated_paths(path) == dropped


@pytest.mark.parametrize(
    ("headers", "lifetime", "age"),
    [
        ({}, 60.0, 0.0),  # ttl is the default
        ({"Cache-Control": "max-age=10"}, 10.0, 0.0),
        ({"Cache-Control": "max-age=10, s-maxage=20"}, 20.0, 0.0),  # s-maxage wins
        ({"Cache-Control": "max-age=600"}, 60.0, 0.0),  # ttl caps
        ({"Age": "7"}, 60.0, 7.0),
        ({"Expires": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0, 0.0),  # in the past
        ({"Expires": "garbage"}, 0.0, 0.0),  # unparseable: already expired
    ],
)
def test_freshness_obeys_s_maxage_max_age_expires_and_the_ttl_cap(
    headers: dict[str, str], lifetime: float, age: float
) -> None:
    found = policy.freshness(
        CIMultiDict(headers), CIMultiDict(headers).getall("Cache-Control", ()), RULE, 1000.0
    )
    assert (found.lifetime, found.initial_age) == (lifetime, age)


@pytest.mark.parametrize(
    ("status", "headers", "why"),
    [
        (200, {}, None),
        (410, {}, None),
        (206, {}, "status"),
        (200, {"Cache-Control": "Private"}, "cache-control"),
        (200, {"Cache-Control": "public, no-store"}, "cache-control"),
        (200, {"Set-Cookie": "a=1"}, "set-cookie"),
    ],
)
def test_what_may_be_stored(status: int, headers: dict[str, str], why: str | None) -> None:
    h = CIMultiDict(headers)
    assert policy.storable(status, h, h.getall("Cache-Control", ())) == why


def test_vary_names_are_sorted_lowercase_and_star_is_uncacheable() -> None:
    assert policy.vary_names(["Accept, Accept-Language", "accept"]) == (
        "accept",
        "accept-language",
    )
    assert policy.vary_names(["Accept, *"]) is None


def test_requests_with_credentials_bypass_unless_keyed_by_a_known_consumer() -> None:
    req = policy.view_request("GET", CIMultiDict({"Authorization": "Bearer x"}))
    by_consumer = CachePolicy(ttl=1.0, key_by=("consumer",))
    assert policy.bypass_reason(req, RULE, "alice") == "credentials"
    assert policy.bypass_reason(req, by_consumer, "") == "credentials"
    assert policy.bypass_reason(req, by_consumer, "alice") is None
    no_cache = policy.view_request("GET", CIMultiDict({"Pragma": "no-cache"}))
    assert no_cache.revalidate
