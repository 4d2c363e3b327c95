"""Command line: serve, --check a config, explain how a request would be handled, or print
the hash of an API key (`hash-key`, the key read from standard input)."""

from __future__ import annotations

import argparse
import sys

from gateway import explain
from gateway.config.model import GatewayConfig


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="API gateway. Also: gateway explain --config FILE METHOD PATH; "
        "gateway hash-key < keyfile",
    )
    parser.add_argument("--config", default="routes.yaml", help="routes.yaml to serve")
    parser.add_argument("--listen", type=_hostport, help="public HOST:PORT (overrides listen:)")
    parser.add_argument("--admin", type=_hostport, help="admin HOST:PORT (overrides admin:)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["explain"]:
        return explain.main(args_list[1:])
    if args_list[:1] == ["hash-key"]:
        return hash_key_main()
    args = _serve_parser().parse_args(args_list)
    if not args.check:
        from gateway.server import defer_signals

        defer_signals()  # a SIGHUP or SIGUSR1 from now on waits for the loop, not kills
    from gateway.config.build import load

    result = load(args.config)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if result.config is None:
        return 1
    if args.check:
        print(f"{args.config}: ok ({len(result.config.routes)} routes)")
        return 0
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    from gateway.server import run

    warnings = [str(w) for w in result.warnings]
    return run(_override(result.config, args), args.config, args.workers, warnings)


def hash_key_main() -> int:
    """Read one API key from standard input (never from argv, which `ps` shows) and print
    the `key_sha256` to put under auth.api_keys."""
    from gateway.auth.apikeys import hash_key

    key = sys.stdin.read().strip()
    if not key:
        print("hash-key: no key on standard input", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _override(config: GatewayConfig, args: argparse.Namespace) -> GatewayConfig:
    from dataclasses import replace

    return replace(config, listen=args.listen or config.listen, admin=args.admin or config.admin)


if __name__ == "__main__":
    sys.exit(main())
