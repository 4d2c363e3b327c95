"""One admin view of N workers: each publishes its answers, whichever answers merges them all.

With --workers N the kernel hands each admin connection to any worker (SO_REUSEPORT), so
/readyz, /routes and /config must not depend on which one. Each worker writes what it would
answer alone to `admin_PID.json` in a directory the supervisor made (GATEWAY_STATE_DIR):
within 0.1 s of a change it can see (a reload, a health verdict, a circuit, draining) and
every 0.5 s anyway (in-flight counts). An answer is merged from the files only, never from
the answering worker's live state, so two workers asked at the same moment say the same.
A worker that dies leaves its file behind until the supervisor removes it (at once, when it
reaps the worker) or it grows stale (not rewritten for STALE_AFTER seconds).

Why files and not the supervisor serving the admin port: a worker keeps its admin listener
as it always had (the single-process code path is the same), the supervisor stays a small
synchronous loop that only spawns and reaps, a supervisor crash does not take the admin
view with it, and the directory is the same idea as prometheus-client's multiprocess one.

Merging: /config and the route table come from the worker whose config loaded last (during
a roll-out that is the new version), with each worker's version listed under `workers`; a
target is healthy only when every worker says so, its circuit is the worst any worker sees
(open, then half-open, then closed), and its in-flight count is the sum; /readyz is 200 only
when every worker is ready, and lists every worker's reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

STATE_DIR_ENV: Final = "GATEWAY_STATE_DIR"  # set by the supervisor for its workers
PUBLISH_INTERVAL: Final = 0.5  # seconds between two writes of a worker's snapshot
CHANGE_POLL: Final = 0.1  # seconds between two looks for a change worth writing at once
STALE_AFTER: Final = 3.0  # seconds after which a snapshot not rewritten is a dead worker's
_CIRCUIT_ORDER: Final = ("closed", "half_open", "open")  # worse to the right

Snapshot = dict[str, Any]  # {"pid", "at", "loaded_at", "readyz", "routes", "config"}


class Snapshots:
    """The shared directory: this worker's file, and everyone's."""

    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid

    def write(self, body: Snapshot) -> None:
        """Replace this worker's file in one rename (a reader sees the old or the new)."""
        path = snapshot_path(self.directory, self.pid)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps({**body, "pid": self.pid, "at": time.time()}))
        os.replace(scratch, path)

    def read(self) -> list[Snapshot]:
        """Every live worker's snapshot, by pid (blocking: call it off the event loop)."""
        now = time.time()
        found = []
        for path in sorted(self.directory.glob("admin_*.json")):
            try:
                body = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # removed meanwhile
            if isinstance(body, dict) and now - float(body.get("at", 0)) <= STALE_AFTER:
                found.append(body)
        return sorted(found, key=lambda b: int(b["pid"]))


def snapshot_path(directory: Path, pid: int) -> Path:
    return directory / f"admin_{pid}.json"


def forget(directory: Path, pid: int) -> None:
    """The supervisor reaped `pid`: its answers are no one's any more."""
    with contextlib.suppress(OSError):
        snapshot_path(directory, pid).unlink()


async def publish_forever(
    shared: Snapshots,
    take: Callable[[], Snapshot],
    fingerprint: Callable[[], object],
) -> None:
    """Write `take()` now, then on every change of `fingerprint()` and every PUBLISH_INTERVAL."""
    loop = asyncio.get_running_loop()
    last: object = None
    written = 0.0
    while True:
        current = fingerprint()
        if current != last or loop.time() - written >= PUBLISH_INTERVAL:
            last, written = current, loop.time()
            body = take()  # taken on the loop: one consistent moment
            with contextlib.suppress(OSError):  # a full disk must not stop the worker
                await asyncio.to_thread(shared.write, body)
        await asyncio.sleep(CHANGE_POLL)


def newest(snapshots: list[Snapshot]) -> Snapshot:
    """The worker whose config loaded last (ties: the lowest pid, for one answer)."""
    return max(snapshots, key=lambda s: (float(s["loaded_at"]), -int(s["pid"])))


def _workers(snapshots: list[Snapshot]) -> list[dict[str, object]]:
    return [
        {
            "pid": s["pid"],
            "version_hash": s["config"]["version_hash"],
            "last_reload": s["config"]["last_reload"]["result"],
            "ready": s["readyz"]["status"] == 200,
        }
        for s in snapshots
    ]


def merge_config(snapshots: list[Snapshot]) -> dict[str, Any]:
    if not snapshots:
        return {"workers": []}
    return {**newest(snapshots)["config"], "workers": _workers(snapshots)}


def merge_readyz(snapshots: list[Snapshot]) -> tuple[int, dict[str, Any]]:
    if not snapshots:
        return 503, {"ready": False, "reasons": ["no worker has reported yet"], "workers": []}
    reasons: list[str] = []
    unavailable: dict[str, dict[str, Any]] = {}
    for s in snapshots:
        body = s["readyz"]["body"]
        reasons.extend(r for r in body["reasons"] if r not in reasons)
        for entry in body["unavailable_services"]:
            merged = unavailable.setdefault(entry["service"], {**entry, "workers": []})
            merged["workers"].append(s["pid"])
    ready = all(s["readyz"]["status"] == 200 for s in snapshots)
    body = {
        "ready": ready,
        "reasons": reasons,
        "unavailable_services": [unavailable[name] for name in sorted(unavailable)],
        "version_hash": newest(snapshots)["config"]["version_hash"],
        "workers": _workers(snapshots),
    }
    return 200 if ready else 503, body


def merge_routes(snapshots: list[Snapshot]) -> dict[str, Any]:
    if not snapshots:
        return {"routes": [], "workers": []}
    base = newest(snapshots)["routes"]
    views: dict[tuple[str, str], list[tuple[object, dict[str, Any]]]] = {}
    for s in snapshots:
        for route in s["routes"]["routes"]:
            for target in route["targets"]:
                views.setdefault((route["name"], target["target"]), []).append((s["pid"], target))
    routes = []
    for route in base["routes"]:
        targets = []
        for target in route["targets"]:
            seen = views.get((route["name"], target["target"]), [])
            targets.append(
                {
                    "target": target["target"],
                    "healthy": all(t["healthy"] for _, t in seen),
                    "circuit": max(
                        (t["circuit"] for _, t in seen),
                        key=_circuit_rank,
                        default=target["circuit"],
                    ),
                    "in_flight": sum(int(t.get("in_flight", 0)) for _, t in seen),
                    "workers": [
                        {"pid": pid, "healthy": t["healthy"], "circuit": t["circuit"]}
                        for pid, t in seen
                    ],
                }
            )
        routes.append({**route, "targets": targets})
    return {"version_hash": base["version_hash"], "routes": routes, "workers": _workers(snapshots)}


def _circuit_rank(state: str) -> int:
    return _CIRCUIT_ORDER.index(state) if state in _CIRCUIT_ORDER else len(_CIRCUIT_ORDER)
