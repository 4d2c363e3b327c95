"""The pieces of --workers N that need no processes: merging workers' admin snapshots, and the
supervisor's restart rate limit."""

from __future__ import annotations

from typing import Any

from gateway.server import RespawnLimit
from gateway.servers.workers import merge_config, merge_readyz, merge_routes


def snapshot(
    pid: int,
    loaded_at: float,
    version: str,
    targets: list[dict[str, Any]],
    reasons: tuple[str, ...] = (),
) -> dict[str, Any]:
    return {
        "pid": pid,
        "at": 0.0,
        "loaded_at": loaded_at,
        "readyz": {
            "status": 503 if reasons else 200,
            "body": {"ready": not reasons, "reasons": list(reasons), "unavailable_services": []},
        },
        "routes": {
            "version_hash": version,
            "routes": [{"name": "routes.0", "prefix": "/a", "targets": targets}],
        },
        "config": {"version_hash": version, "last_reload": {"result": "applied"}, "text": version},
    }


def target(label: str, healthy: bool, circuit: str, in_flight: int) -> dict[str, Any]:
    return {"target": label, "healthy": healthy, "circuit": circuit, "in_flight": in_flight}


def test_a_target_is_healthy_only_if_every_worker_says_so_and_shows_its_worst_circuit() -> None:
    one = snapshot(
        10, 1.0, "v1", [target("s#0", True, "closed", 2), target("s#1", True, "open", 0)]
    )
    two = snapshot(
        11, 1.0, "v1", [target("s#0", False, "half_open", 1), target("s#1", True, "closed", 0)]
    )

    merged = merge_routes([one, two])

    targets = merged["routes"][0]["targets"]
    assert [(t["healthy"], t["circuit"], t["in_flight"]) for t in targets] == [
        (False, "half_open", 3),
        (True, "open", 0),
    ]
    assert [w["pid"] for w in targets[0]["workers"]] == [10, 11]


def test_config_during_a_roll_out_is_the_newest_load_with_every_workers_version() -> None:
    old, new = snapshot(10, 1.0, "v1", []), snapshot(11, 2.0, "v2", [])

    merged = merge_config([old, new])

    assert merged["version_hash"] == "v2"
    assert merged["text"] == "v2"
    assert [(w["pid"], w["version_hash"]) for w in merged["workers"]] == [(10, "v1"), (11, "v2")]


def test_readyz_is_503_when_any_worker_is_not_ready_and_lists_its_reasons_once() -> None:
    draining = ("shutting down: draining in-flight requests",)
    workers = [snapshot(10, 1.0, "v1", [], draining), snapshot(11, 1.0, "v1", [], draining)]

    status, body = merge_readyz(workers)
    ok_status, _ = merge_readyz([snapshot(10, 1.0, "v1", [])])
    empty_status, _ = merge_readyz([])

    assert (status, body["reasons"]) == (503, list(draining))
    assert ok_status == 200
    assert empty_status == 503


def test_restarts_are_limited_to_five_in_thirty_seconds_then_wait_their_turn() -> None:
    limit = RespawnLimit(limit=5, window=30.0)

    times = [limit.next_at(100.0) for _ in range(7)]
    later = limit.next_at(200.0)

    assert times == [100.0] * 5 + [130.0, 130.0]
    assert later == 200.0
