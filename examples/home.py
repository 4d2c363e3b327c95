"""Compose handlers over the inventory service (routes.yaml: /api/home/rooms and
/api/home/scenes/{name}).

A scene sets the state of every device of some types: `night` turns every light off and
locks every lock. Each device is read (for its current state and ETag) and written with
`If-Match`, so a device someone changed in between is reported and never overwritten. The
answer lists what changed and what did not, and why:

    {"scene": "night",
     "changed":   [{"id": "3", "name": "Hall light", "type": "light", "state": {"on": false}}],
     "unchanged": [{"id": "5", "name": "Porch lock", "type": "lock",
                    "reason": "changed by someone else meanwhile; not overwritten"}]}
"""

from __future__ import annotations

import asyncio
from typing import Any, Final
from urllib.parse import quote

from gateway.actions.compose import CallResult, ComposeRequest, Context
from gateway.http.pipeline import UpstreamResponse

SERVICE: Final = "inventory"
PAGE: Final = 500  # the inventory's largest page
# scene -> (device type, the state it must have), in the order they are applied
SCENES: Final[dict[str, tuple[tuple[str, dict[str, Any]], ...]]] = {
    "night": (("light", {"on": False}), ("lock", {"locked": True})),
    "morning": (("light", {"on": True}), ("lock", {"locked": False})),
}
MERGE_PATCH: Final = "application/merge-patch+json"
Device = dict[str, Any]


async def devices(ctx: Context, query: str = "") -> list[Device]:
    """Every device (of `query`, such as "type=light"), following the inventory's cursors."""
    found: list[Device] = []
    cursor = None
    while True:
        path = f"/devices?limit={PAGE}" + (f"&{query}" if query else "")
        if cursor is not None:
            path += f"&cursor={quote(cursor, safe='')}"
        page = await ctx.call(SERVICE, "GET", path)
        if not page.ok:
            ctx.fail(502, f"the inventory answered {page.status} to a device list")
        found += page.json["items"]
        cursor = page.json["next_cursor"]
        if cursor is None:
            return found


async def rooms(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    """GET /api/home/rooms: per room, how many devices of each type it holds."""
    counts: dict[str, dict[str, int]] = {}
    for device in await devices(ctx):
        room = counts.setdefault(device["room"], {})
        room[device["type"]] = room.get(device["type"], 0) + 1
    return ctx.json(
        200,
        {name: {"total": sum(kinds.values()), **kinds} for name, kinds in sorted(counts.items())},
    )


async def scene(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    """POST /api/home/scenes/{name}."""
    name = request.path.strip("/")
    wanted = SCENES.get(name)
    if wanted is None:
        return ctx.json(404, {"detail": f"no scene named {name[:40]!r}", "scenes": sorted(SCENES)})
    changed: list[Device] = []
    unchanged: list[Device] = []
    for kind, state in wanted:
        found = await devices(ctx, f"type={kind}")
        outcomes = await asyncio.gather(*(_apply(ctx, device, state) for device in found))
        for device, reason in zip(found, outcomes, strict=True):
            entry = {"id": device["id"], "name": device["name"], "type": kind}
            if reason is None:
                changed.append({**entry, "state": state})
            else:
                unchanged.append({**entry, "reason": reason})
    return ctx.json(200, {"scene": name, "changed": changed, "unchanged": unchanged})


async def _apply(ctx: Context, device: Device, state: dict[str, Any]) -> str | None:
    """None when the device was changed, else why not."""
    path = f"/devices/{quote(device['id'], safe='')}"
    current = await ctx.call(SERVICE, "GET", path)
    if current.status == 404:
        return "deleted meanwhile"
    if not current.ok:
        return f"the inventory answered {current.status}"
    if all(current.json.get("state", {}).get(k) == v for k, v in state.items()):
        return "already " + _describe(state)
    written = await ctx.call(
        SERVICE,
        "PATCH",
        path,
        json={"state": state},
        headers={"If-Match": current.headers["ETag"], "Content-Type": MERGE_PATCH},
    )
    return None if written.ok else _refused(written)


def _refused(written: CallResult) -> str:
    if written.status == 412:
        return "changed by someone else meanwhile; not overwritten"
    if written.status == 404:
        return "deleted meanwhile"
    return f"the inventory answered {written.status}"


WORDS: Final = {("on", True): "on", ("on", False): "off", ("locked", True): "locked",
                ("locked", False): "unlocked"}  # fmt: skip


def _describe(state: dict[str, Any]) -> str:
    return ", ".join(WORDS.get((key, value), f"{key}={value}") for key, value in state.items())
