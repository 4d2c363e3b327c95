"""`python -m examples.shop products|payments|orders --listen HOST:PORT`: one shop service."""

from __future__ import annotations

import argparse

from aiohttp import web

from examples.shop.services import APPS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.shop", description=__doc__)
    parser.add_argument("service", choices=sorted(APPS))
    parser.add_argument("--listen", default="127.0.0.1:8101", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    web.run_app(APPS[args.service](), host=host or "127.0.0.1", port=int(port), print=None)


if __name__ == "__main__":
    main()
