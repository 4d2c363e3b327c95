"""Command line: `python -m inventory --db PATH [--listen HOST:PORT]`.

Parses arguments, sets up logging and hands over to `web.run_app`, which stops cleanly on
SIGINT (Ctrl-C) and SIGTERM. Exits 1 with one line on stderr when the store cannot be
opened (for example another inventory already holds the file).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from aiohttp import web

from inventory.app import create_app
from inventory.store import StoreError

logger = logging.getLogger("inventory")

DEFAULT_LISTEN: Final = "127.0.0.1:8001"
SHUTDOWN_TIMEOUT_SECONDS: Final = 10.0
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces) into (host, port)."""
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdecimal() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inventory", description="Smart-home device inventory")
    parser.add_argument("--db", type=Path, required=True, help="store file (created if missing)")
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="INFO logs one access line per request (default INFO)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    host, port = args.listen
    try:
        web.run_app(
            create_app(args.db),
            host=host,
            port=port,
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
            print=lambda message: logger.info("%s", message.strip()),
        )
    except StoreError as exc:
        parser.exit(1, f"inventory: {exc}\n")


if __name__ == "__main__":
    main()
