"""Cursor paging: limits and cursors, page selection as a property, and GET /devices."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inventory.errors import InvalidQuery
from inventory.paging import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    decode_cursor,
    encode_cursor,
    parse_limit,
    select_page,
)
from inventory.store import DeviceStore, Filters
from tests.inventory.conftest import HALL_LIGHT, Client, MakeDevice

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

# Between two page requests: add n devices, delete the one at (index mod size), or nothing.
Step = tuple[str, int]
steps = st.lists(
    st.tuples(st.sampled_from(["add", "delete", "none"]), st.integers(0, 40)), max_size=12
)


@pytest.mark.parametrize(
    ("raw", "limit"), [(None, DEFAULT_LIMIT), ("1", 1), ("500", MAX_LIMIT), ("007", 7)]
)
def test_a_good_limit_is_parsed(raw: str | None, limit: int) -> None:
    assert parse_limit(raw) == limit


@pytest.mark.parametrize("raw", ["0", "501", "-1", "1.5", "abc", "", " 5", "\u0665", "1e2"])
def test_a_bad_limit_is_an_invalid_query(raw: str) -> None:
    with pytest.raises(InvalidQuery, match="limit must be an integer from 1 to 500"):
        parse_limit(raw)


@given(st.integers(0, 10**18))
def test_a_cursor_decodes_to_the_key_it_was_made_from(after: int) -> None:
    assert decode_cursor(encode_cursor(after)) == after


@pytest.mark.parametrize(
    "cursor", ["", "!!!", "djE6", "djI6NQ", "eHl6", "djE6LTE", "a" * 100, "djE6NQ==é"]
)
def test_a_cursor_the_service_did_not_issue_is_an_invalid_query(cursor: str) -> None:
    with pytest.raises(InvalidQuery, match="cursor"):
        decode_cursor(cursor)


def _page_through(
    keys: list[int], limit: int, between: list[Step], matches: Any = lambda _k: True
) -> tuple[list[int], set[int], set[int]]:
    """Page to the end, mutating `keys` between pages; returns (seen, always there, ever there)."""
    seen: list[int] = []
    always, ever = set(keys), set(keys)
    after: int | None = None
    for turn in range(10_000):
        page = select_page(keys, after, limit, matches)
        assert len(page.keys) <= limit
        assert set(page.keys) <= set(keys)
        seen.extend(page.keys)
        if page.next_after is None:
            return seen, always, ever
        after = page.next_after
        action, n = between[turn] if turn < len(between) else ("none", 0)
        if action == "add":
            start = (max(ever) if ever else 0) + 1
            keys.extend(range(start, start + n % 5 + 1))
            ever.update(keys)
        elif action == "delete" and keys:
            always.discard(keys.pop(n % len(keys)))
    raise AssertionError("paging did not end")


@given(keys=st.lists(st.integers(1, 300), unique=True), limit=st.integers(1, 12), between=steps)
@PROPERTY_SETTINGS
def test_paging_yields_each_key_once_in_order_despite_adds_and_deletes(
    keys: list[int], limit: int, between: list[Step]
) -> None:
    seen, always, ever = _page_through(sorted(keys), limit, between)

    assert seen == sorted(set(seen))  # in order, no repeats
    assert always <= set(seen)  # nothing that stayed was skipped
    assert set(seen) <= ever  # nothing invented


@given(keys=st.lists(st.integers(1, 300), unique=True), limit=st.integers(1, 12))
@PROPERTY_SETTINGS
def test_a_filtered_page_is_never_empty_unless_it_is_the_only_one(
    keys: list[int], limit: int
) -> None:
    keys.sort()
    pages = []
    after: int | None = None
    while True:
        page = select_page(keys, after, limit, lambda k: k % 3 == 0)
        pages.append(page.keys)
        if page.next_after is None:
            break
        after = page.next_after

    assert [k for page in pages for k in page] == [k for k in keys if k % 3 == 0]
    assert all(pages) or len(pages) == 1


async def _store_paging(path: Path, initial: int, limit: int, between: list[Step]) -> None:
    store = await DeviceStore.open(path)
    try:
        for i in range(initial):
            await store.create({**HALL_LIGHT, "name": f"d{i}", "type": ("light", "plug")[i % 2]})
        always = {d["id"] for d in (await store.page(Filters(type="plug"), None, 500)).items}
        seen: list[str] = []
        after: int | None = None
        for turn in range(1000):
            page = await store.page(Filters(type="plug"), after, limit)
            seen.extend(d["id"] for d in page.items)
            if page.next_after is None:
                break
            after = page.next_after
            action, n = between[turn] if turn < len(between) else ("none", 0)
            current = (await store.page(Filters(), None, 500)).items
            if action == "add":
                await store.create({**HALL_LIGHT, "type": "plug"})
            elif action == "delete" and current:
                victim = current[n % len(current)]["id"]
                await store.delete(victim, if_match=None)
                always.discard(victim)
        assert [int(i) for i in seen] == sorted({int(i) for i in seen})
        assert always <= set(seen)
    finally:
        await store.close()


@given(initial=st.integers(0, 14), limit=st.integers(1, 5), between=steps)
@settings(max_examples=15, deadline=None)
def test_paging_the_real_store_yields_each_device_once_in_order(
    initial: int, limit: int, between: list[Step]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_store_paging(Path(directory) / "db", initial, limit, between))


async def _list(client: Client, **params: str) -> dict[str, Any]:
    async with client.get("/devices", params=params) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_listing_an_empty_store_is_one_empty_last_page(client: Client) -> None:
    assert await _list(client) == {"items": [], "next_cursor": None}


async def test_listing_filters_by_type_and_room(client: Client, make_device: MakeDevice) -> None:
    await make_device(type="light", room="hall")
    lock = await make_device(type="lock", room="hall")
    await make_device(type="lock", room="porch")

    assert (await _list(client, type="lock", room="hall"))["items"] == [lock]
    assert len((await _list(client, type="lock"))["items"]) == 2
    assert len((await _list(client, room="hall"))["items"]) == 2
    assert (await _list(client, room="attic"))["items"] == []


async def test_listing_pages_with_next_cursor_until_it_is_null(
    client: Client, make_device: MakeDevice
) -> None:
    created = [(await make_device(name=f"d{i}"))["id"] for i in range(7)]

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await _list(client, limit="3", **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 3
        seen.extend(d["id"] for d in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == created


async def test_listing_order_holds_while_devices_come_and_go_between_pages(
    client: Client, make_device: MakeDevice
) -> None:
    ids = [(await make_device(name=f"d{i}"))["id"] for i in range(6)]
    first = await _list(client, limit="2")
    await client.delete(f"/devices/{ids[0]}")  # already seen
    await client.delete(f"/devices/{ids[3]}")  # not seen yet
    added = await make_device(name="late")

    rest = await _list(client, limit="10", cursor=first["next_cursor"])

    assert [d["id"] for d in first["items"]] == ids[:2]
    assert [d["id"] for d in rest["items"]] == [ids[2], ids[4], ids[5], added["id"]]


async def test_the_default_limit_is_50(client: Client, make_device: MakeDevice) -> None:
    await asyncio.gather(*(make_device(name=f"d{i}") for i in range(DEFAULT_LIMIT + 1)))

    page = await _list(client)

    assert len(page["items"]) == DEFAULT_LIMIT
    assert page["next_cursor"] is not None


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"cursor": "nope"}, {"type": "lamp"}],
    ids=["limit-0", "limit-501", "limit-x", "cursor", "type"],
)
async def test_a_bad_list_query_is_a_400_problem(client: Client, params: dict[str, str]) -> None:
    async with client.get("/devices", params=params) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["status"] == 400
