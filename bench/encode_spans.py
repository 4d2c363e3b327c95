"""CPU per 1,000 of the gateway's spans in the export process, by step: making them of the
gateway's records (gateway/ops/spanrecord.py), and encoding and serializing them with the
SDK's `encode_spans` and with gateway/ops/otlpencode.py's (the same bytes, checked first).

    .venv/bin/python bench/encode_spans.py [--requests 500] [--repeat 30]

Each request is a proxied GET: a server span and a forward's client span. The best of
`--repeat` runs of each, in process CPU time (other work on the machine barely moves it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as sdk_encode_spans,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.ops import otlpencode
from gateway.ops.spanrecord import RequestRecord, SharedResource, spans_of

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def record(n: int) -> RequestRecord:
    """A proxied GET the gateway recorded, begun here, answered 200 by its upstream."""
    return (
        f"00-{TRACE}-00000000000000bb-01", "00000000000000aa", "", "", "GET", f"/api/{n}",
        "http", 200, "127.0.0.1", "/api", "routes.0", 10**18, 1.0, 0.25,
        [("echo", "forward", "echo#0", 1, 0.5, 2.0, 200, "ok")],
    )  # fmt: skip


def best(work: Callable[[], object], repeat: int) -> float:
    """The least process CPU seconds of `repeat` runs of `work`."""
    least = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        least = min(least, time.process_time() - started)
    return least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    records = [record(n) for n in range(args.requests)]
    resource, scope = SharedResource({"service.name": "edge"}), InstrumentationScope("gateway")
    spans = spans_of(records, resource, scope)
    sdk = sdk_encode_spans(spans).SerializePartialToString()
    if otlpencode.encode_spans(spans).SerializePartialToString() != sdk:
        raise SystemExit("the adapter's request is not the SDK's")
    per = 1000 / len(spans) * 1000  # seconds per run -> ms per 1,000 spans
    made = best(lambda: spans_of(records, resource, scope), args.repeat) * per
    theirs = best(lambda: sdk_encode_spans(spans).SerializePartialToString(), args.repeat) * per
    ours = best(lambda: otlpencode.encode_spans(spans).SerializePartialToString(), args.repeat)
    ours *= per
    print(f"{len(spans)} spans ({len(sdk):,} bytes a request); CPU ms per 1,000 spans:")
    print(f"  made of records (spans_of)     {made:6.2f}")
    print(f"  SDK encode_spans + serialize   {theirs:6.2f}")
    print(f"  adapter's, + serialize         {ours:6.2f}  ({theirs / ours:.1f}x less)")


if __name__ == "__main__":
    main()
