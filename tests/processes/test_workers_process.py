"""`--workers 2` as one gateway: a worker killed with SIGKILL is started again while the other
serves, and the admin listener gives one merged answer whichever worker accepts it (/config
after an edit, /routes with a target down, /readyz)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.polling import eventually, free_port
from tests.processes.procs import GatewayProcess
from tests.upstreams import make_echo_app

ROUTES = """version: 1
services:
  echo:
    targets: [$ECHO, http://127.0.0.1:$DEAD]
    health_check: {path: /health, interval: 100ms, unhealthy_threshold: 1}
routes:
  - prefix: /echo
    service: echo
"""
ADMIN_ASKS = 30  # admin requests, each on a new connection: the kernel spreads them


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_echo_app())


def write_routes(path: Path, upstream: TestServer, dead: int, extra: str = "") -> None:
    url = str(upstream.make_url("")).rstrip("/")
    path.write_text(ROUTES.replace("$ECHO", url).replace("$DEAD", str(dead)) + extra)


async def admin_get(gateway: GatewayProcess, path: str) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{gateway.admin_url}{path}") as resp,
    ):
        return resp.status, await resp.json()


async def worker_pids(gateway: GatewayProcess) -> list[int]:
    _, body = await admin_get(gateway, "/config")
    return [int(w["pid"]) for w in body["workers"]]


async def status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return 0


async def two_workers_reported(gateway: GatewayProcess) -> list[int]:
    pids: list[int] = []

    async def two() -> bool:
        pids[:] = await worker_pids(gateway)
        return len(pids) == 2

    await eventually(two, within=10)
    return pids


async def test_a_killed_worker_is_started_again_and_requests_keep_succeeding(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, echo, free_port())
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        before = await two_workers_reported(gateway)
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
        async with aiohttp.ClientSession(connector=connector) as session:
            os.kill(before[0], signal.SIGKILL)  # between two requests: none is in flight on it
            codes = [await status(session, f"{gateway.url}/echo/{i}") for i in range(30)]
            await eventually(lambda: gateway.listening() == 3, within=15)  # the new one
            after: list[int] = []

            async def replaced() -> bool:
                after[:] = await worker_pids(gateway)
                return len(after) == 2 and before[0] not in after

            await eventually(replaced, within=10)
            codes += [await status(session, f"{gateway.url}/echo/{i}") for i in range(30)]
        running = gateway.process.returncode is None
        code = await gateway.stop()
    finally:
        await gateway.kill()

    assert set(codes) == {200}, gateway.output()
    assert running
    assert before[1] in after
    assert f"worker {before[0]} exited with -9; restarting it" in gateway.output()
    assert code == 0, gateway.output()


async def test_config_shows_one_version_whichever_worker_answers_after_an_edit(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    dead = free_port()
    write_routes(config, echo, dead)
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        await two_workers_reported(gateway)
        _, first = await admin_get(gateway, "/config")
        write_routes(config, echo, dead, "  - prefix: /added\n    service: echo\n")

        async def both_reloaded() -> bool:
            _, body = await admin_get(gateway, "/config")
            versions = {w["version_hash"] for w in body["workers"]}
            return versions == {body["version_hash"]} and body["version_hash"] != first[
                "version_hash"
            ] and len(body["workers"]) == 2  # fmt: skip

        await eventually(both_reloaded, within=5)
        answers = [await admin_get(gateway, "/config") for _ in range(ADMIN_ASKS)]
        gateway.send_signal(signal.SIGHUP)  # reloads both again: still one version
        await eventually(lambda: gateway.output().count("reload applied") >= 4, within=5)
        answers += [await admin_get(gateway, "/config") for _ in range(ADMIN_ASKS)]
        routes = [await admin_get(gateway, "/routes") for _ in range(ADMIN_ASKS)]
    finally:
        await gateway.kill()

    hashes = {body["version_hash"] for _, body in answers}
    assert len(hashes) == 1
    assert hashes != {first["version_hash"]}
    assert {len(body["workers"]) for _, body in answers} == {2}
    assert {w["version_hash"] for _, body in answers for w in body["workers"]} == hashes
    assert {tuple(r["prefix"] for r in body["routes"]) for _, body in routes} == {
        ("/echo", "/added")
    }


async def test_routes_and_readyz_show_a_dead_target_down_in_every_worker_whichever_answers(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, echo, free_port())
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        await two_workers_reported(gateway)

        async def down_in_both() -> bool:
            _, body = await admin_get(gateway, "/routes")
            dead = body["routes"][0]["targets"][1]
            return [w["healthy"] for w in dead["workers"]] == [False, False]

        await eventually(down_in_both, within=10)
        started = time.monotonic()
        routes = [await admin_get(gateway, "/routes") for _ in range(ADMIN_ASKS)]
        ready = [await admin_get(gateway, "/readyz") for _ in range(ADMIN_ASKS)]
        took = time.monotonic() - started
    finally:
        await gateway.kill()

    targets = [body["routes"][0]["targets"] for _, body in routes]
    assert {(t[0]["healthy"], t[1]["healthy"]) for t in targets} == {(True, False)}
    assert {len(t[1]["workers"]) for t in targets} == {2}
    assert {(code, body["ready"], len(body["workers"])) for code, body in ready} == {(200, True, 2)}
    assert took < 10
