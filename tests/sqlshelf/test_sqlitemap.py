"""SqliteMapping: a dict-like, crash-safe bytes store, and shelve.Shelf on top of it."""

from __future__ import annotations

import shelve
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqlshelf import SqliteMapError, SqliteMapping


@pytest.fixture
def mapping(tmp_path: Path) -> Iterator[SqliteMapping]:
    opened = SqliteMapping(tmp_path / "map.db")
    yield opened
    opened.close()


def test_it_behaves_like_a_dict_of_bytes(mapping: SqliteMapping) -> None:
    mapping[b"a"] = b"1"
    mapping[b"b"] = b"2"
    mapping[b"a"] = b"3"
    del mapping[b"b"]

    assert dict(mapping) == {b"a": b"3"}
    assert len(mapping) == 1
    assert b"a" in mapping
    assert b"b" not in mapping
    with pytest.raises(KeyError):
        mapping[b"b"]
    with pytest.raises(KeyError):
        del mapping[b"b"]


def test_it_runs_sqlite_in_wal_mode_with_full_sync_and_an_exclusive_lock(
    mapping: SqliteMapping,
) -> None:
    assert mapping.pragma("journal_mode") == "wal"
    assert mapping.pragma("synchronous") == 2  # FULL: the WAL is fsynced at every commit
    assert mapping.pragma("locking_mode") == "exclusive"


def test_writes_are_still_there_after_reopening(tmp_path: Path) -> None:
    first = SqliteMapping(tmp_path / "map.db")
    first[b"k"] = b"v"
    first.close()

    second = SqliteMapping(tmp_path / "map.db")
    assert second[b"k"] == b"v"
    second.close()


def test_closing_folds_the_wal_back_into_the_file(tmp_path: Path) -> None:
    mapping = SqliteMapping(tmp_path / "map.db")
    mapping[b"k"] = b"v"
    assert (tmp_path / "map.db-wal").exists()

    mapping.close()

    assert not (tmp_path / "map.db-wal").exists()


def test_a_transaction_commits_its_writes_together(mapping: SqliteMapping) -> None:
    with mapping.transaction(), mapping.transaction():  # nested: still one commit
        mapping[b"a"] = b"1"
        mapping[b"b"] = b"2"

    assert dict(mapping) == {b"a": b"1", b"b": b"2"}


def test_a_failed_transaction_writes_nothing(mapping: SqliteMapping) -> None:
    mapping[b"a"] = b"before"

    def fail_midway() -> None:
        with mapping.transaction():
            mapping[b"a"] = b"after"
            mapping[b"b"] = b"2"
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail_midway()

    assert dict(mapping) == {b"a": b"before"}


def test_a_second_opener_of_the_same_file_is_refused(
    mapping: SqliteMapping, tmp_path: Path
) -> None:
    with pytest.raises(SqliteMapError, match=r"locked.*another process"):
        SqliteMapping(tmp_path / "map.db", lock_timeout=0.05)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all, " * 100)

    with pytest.raises(SqliteMapError, match="cannot open"):
        SqliteMapping(tmp_path / "junk.db")


def test_use_from_another_thread_fails_loudly(mapping: SqliteMapping) -> None:
    errors: list[BaseException] = []

    def touch() -> None:
        try:
            mapping[b"x"] = b"y"
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=touch)
    worker.start()
    worker.join(timeout=5)

    assert len(errors) == 1
    assert "thread" in str(errors[0])


def test_a_closed_mapping_refuses_use(tmp_path: Path) -> None:
    mapping = SqliteMapping(tmp_path / "map.db")
    mapping.close()
    mapping.close()  # idempotent

    with pytest.raises(ValueError, match="closed"):
        mapping[b"k"] = b"v"


def test_shelve_stores_python_values_through_it(tmp_path: Path) -> None:
    device = {"name": "Hall light", "state": {"on": True}}
    writer: shelve.Shelf[object] = shelve.Shelf(SqliteMapping(tmp_path / "map.db"))
    with writer:
        writer["device:1"] = device

    reader: shelve.Shelf[object] = shelve.Shelf(SqliteMapping(tmp_path / "map.db"))
    with reader:
        assert dict(reader) == {"device:1": device}


def test_shared_mode_lets_two_connections_read_and_write_one_file(tmp_path: Path) -> None:
    first = SqliteMapping(tmp_path / "shared.db", shared=True)
    second = SqliteMapping(tmp_path / "shared.db", shared=True)
    try:
        first[b"a"] = b"1"
        assert second[b"a"] == b"1"
        del second[b"a"]
        assert b"a" not in first
        assert first.pragma("journal_mode") == "wal"
    finally:
        first.close()
        second.close()


def test_an_exclusive_file_cannot_be_opened_shared_beside_it(tmp_path: Path) -> None:
    owner = SqliteMapping(tmp_path / "own.db")
    owner[b"a"] = b"1"
    try:
        with pytest.raises(SqliteMapError):
            SqliteMapping(tmp_path / "own.db", shared=True, lock_timeout=0.1)[b"a"]
    finally:
        owner.close()


def test_keys_with_prefix_is_exactly_the_keys_that_start_with_it(mapping: SqliteMapping) -> None:
    for key in (
        b"/a\x00x",
        b"/a\x00y",
        b"/a/b\x00z",
        b"/ab\x00w",
        b"/b",
        b"\xff\xff",
        b"\xff\xff1",
    ):
        mapping[key] = b"v"

    assert sorted(mapping.keys_with_prefix(b"/a\x00")) == [b"/a\x00x", b"/a\x00y"]
    assert sorted(mapping.keys_with_prefix(b"/a/")) == [b"/a/b\x00z"]
    assert sorted(mapping.keys_with_prefix(b"\xff\xff")) == [b"\xff\xff", b"\xff\xff1"]
    with pytest.raises(ValueError, match="empty prefix"):
        mapping.keys_with_prefix(b"")
