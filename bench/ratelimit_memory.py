"""Bytes per key of the memory rate-limit store, measured with tracemalloc.

    python bench/ratelimit_memory.py [--keys 100000]

Fills a MemoryStore with distinct client-address keys (as a key-spraying client would, on a
limit whose buckets stay non-full) and reports the traced bytes per key, key strings included.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config.model import RateLimitPolicy
from gateway.ratelimit.memory import MemoryStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    policy = RateLimitPolicy(limit=100, per=60.0)
    route = "rl:/api/inventory|"  # what the stage prefixes, as in production
    clock = iter(range(10**12))
    store = MemoryStore(lambda: next(clock), max_keys=args.keys)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(args.keys):  # each key made here, as the stage makes it per request
        store.take(f"{route}ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", policy)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(store) == args.keys
    per_key = (after - before) / args.keys
    print(f"{args.keys} keys: {(after - before) / 2**20:.1f} MiB, {per_key:.0f} bytes per key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
