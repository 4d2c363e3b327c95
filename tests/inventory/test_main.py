"""The command line: argument parsing (the process itself is tested in tests/processes)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from inventory.__main__ import DEFAULT_LISTEN, build_parser, parse_listen


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:8001", ("127.0.0.1", 8001)),
        ("localhost:0", ("localhost", 0)),
        (":9000", ("0.0.0.0", 9000)),
        ("[::1]:8001", ("::1", 8001)),
    ],
)
def test_listen_addresses_are_parsed(value: str, address: tuple[str, int]) -> None:
    assert parse_listen(value) == address


@pytest.mark.parametrize("value", ["8001", "host:", "host:http", "host:70000", "host:-1"])
def test_a_bad_listen_address_is_refused(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        parse_listen(value)


def test_db_is_required_and_listen_has_a_default() -> None:
    args = build_parser().parse_args(["--db", "var/inventory.db"])

    assert args.db == Path("var/inventory.db")
    assert args.listen == parse_listen(DEFAULT_LISTEN)
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
