"""`python -m gateway` as an operator runs it: edit-the-file reload under load, SIGHUP, SIGTERM
draining a slow response, --workers 2 with summed metrics, and --check."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpServer

from tests.polling import POLL, eventually, free_port, poll_until
from tests.processes.inventory_process import REPO_ROOT
from tests.processes.procs import EXIT_TIMEOUT_SECONDS, GatewayProcess
from tests.upstreams import make_echo_app, make_slow

ROUTES = """version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - prefix: /echo
    service: echo
"""
ADDED = (
    ROUTES
    + """  - prefix: /added
    service: echo
"""
)


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_echo_app())


def write_routes(path: Path, template: str, upstream: TestServer) -> None:
    path.write_text(template.replace("$ECHO", str(upstream.make_url("")).rstrip("/")))


async def status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return 0


async def config_of(gateway: GatewayProcess) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.admin_url}/config") as r:
        body: dict[str, object] = await r.json()
        return body


def last_reload(body: dict[str, object]) -> dict[str, object]:
    last = body["last_reload"]
    assert isinstance(last, dict)
    return last


async def test_an_edited_file_is_served_within_2s_under_load_with_no_failed_request(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, ROUTES, echo)
    gateway = await GatewayProcess.start(config)
    answered: list[int] = []
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:

            async def load_loop() -> None:
                while not stop.is_set():
                    answered.append(await status(session, f"{gateway.url}/echo/x"))

            workers = [asyncio.create_task(load_loop()) for _ in range(4)]
            try:
                write_routes(config, ADDED, echo)
                edited = time.monotonic()
                seen = await poll_until(
                    lambda: status(session, f"{gateway.url}/added/x"),
                    lambda s: s == 200,
                    within=2.0,
                )
                took = time.monotonic() - edited
                count = len(answered)
                await poll_until(
                    lambda: asyncio.sleep(0, len(answered)), lambda n: n > count + 20, within=2.0
                )
            finally:
                stop.set()
                await asyncio.gather(*workers)
    finally:
        await gateway.kill()

    assert seen == 200, gateway.output()
    assert took < 2.0
    assert len(answered) > 20
    assert set(answered) == {200}


async def test_sighup_reports_an_invalid_edit_and_applies_a_valid_one_at_once(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, ROUTES, echo)
    gateway = await GatewayProcess.start(config)
    try:
        before = config.stat()
        # Edits that keep size, inode and mtime: only SIGHUP can make the gateway notice them.
        write_routes(config, ROUTES.replace("service: echo", "servic3: echo"), echo)
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
        gateway.send_signal(signal.SIGHUP)
        rejected = await poll_until(
            lambda: config_of(gateway), lambda b: not last_reload(b)["ok"], within=1.0
        )
        write_routes(config, ROUTES.replace("/echo", "/ohce"), echo)
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
        gateway.send_signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as session:
            served = await poll_until(
                lambda: status(session, f"{gateway.url}/ohce/x"), lambda s: s == 200, within=1.0
            )
    finally:
        await gateway.kill()

    assert last_reload(rejected)["errors"] == [
        f"{config}:5:5: routes.0: a route needs one action: service, aggregate or compose",
        f"{config}:6:5: routes.0.servic3: unknown key 'servic3'; did you mean 'service'?",
    ], gateway.output()
    assert served == 200


async def test_sigterm_during_a_slow_response_still_delivers_it_and_exits_0(
    tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    started = asyncio.Event()
    app = web.Application()
    app.router.add_get("/slow", make_slow(2.0, started))
    upstream = await aiohttp_server(app)
    config = tmp_path / "routes.yaml"
    write_routes(config, ROUTES.replace("/echo", "/slow"), upstream)
    gateway = await GatewayProcess.start(config)
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(f"{gateway.url}/slow"))
            await asyncio.wait_for(started.wait(), 5.0)
            gateway.send_signal(signal.SIGTERM)
            readyz = await poll_until(
                lambda: status(session, f"{gateway.admin_url}/readyz"),
                lambda s: s == 503,
                within=1.5,
            )
            resp = await slow
            body = await resp.json()
        code = await asyncio.wait_for(gateway.process.wait(), EXIT_TIMEOUT_SECONDS)
    finally:
        await gateway.kill()

    assert readyz == 503
    assert (resp.status, body) == (200, {"slow": True})
    assert code == 0, gateway.output()
    lines = gateway.json_lines()
    access = [line for line in lines if line.get("path") == "/slow"]
    assert [line["status"] for line in access] == [200]  # flushed before the process ended
    assert lines[-1]["message"] == "stopped"


async def test_two_workers_share_the_port_and_metrics_sum_across_them(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, ROUTES, echo)
    metrics_dir = tmp_path / "metrics"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    gateway = await GatewayProcess.start(config, workers=2, env=env)
    try:
        # A new connection per request: the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            codes = [await status(session, f"{gateway.url}/echo/{i}") for i in range(40)]

            # Each worker moves its counts to the shared files at least once a second.
            async def all_counted() -> bool:
                return await requests_total(session, gateway) == 40

            await eventually(all_counted, within=5)
            totals = [await requests_total(session, gateway) for _ in range(6)]
        exit_code = await gateway.stop(signal.SIGTERM)
    finally:
        await gateway.kill()

    assert set(codes) == {200}
    per_worker = requests_per_worker(metrics_dir)
    assert len(per_worker) == 2
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert totals == [40.0] * 6  # whichever worker answers the scrape sums both
    assert exit_code == 0, gateway.output()


def requests_per_worker(metrics_dir: Path) -> dict[str, float]:
    """What each worker counted on its own, from its own file (counter_PID.db)."""
    counts = {}
    for file in metrics_dir.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(file)])  # type: ignore[no-untyped-call]  # not annotated upstream
        counts[file.stem.removeprefix("counter_")] = sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == "gateway_requests_total"
        )
    return counts


async def requests_total(session: aiohttp.ClientSession, gateway: GatewayProcess) -> float:
    async with session.get(f"{gateway.admin_url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels["route"] == "routes.0"
    )


def access_paths(path: Path) -> list[str]:
    """The paths of the access lines in the file at `path` (none while it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line)["path"] for line in path.read_text().splitlines()]


async def test_sigusr1_reopens_the_access_log_that_logrotate_renamed(
    tmp_path: Path, echo: TestServer
) -> None:
    config, log, rotated = tmp_path / "routes.yaml", tmp_path / "access.log", tmp_path / "old.log"
    write_routes(config, f"{ROUTES}access_log: {log}\n", echo)
    gateway = await GatewayProcess.start(config)
    try:
        async with aiohttp.ClientSession() as session:
            assert await status(session, f"{gateway.url}/echo/before") == 200
            await eventually(lambda: access_paths(log) == ["/echo/before"], within=2)
            log.rename(rotated)  # what logrotate does, without copytruncate
            gateway.send_signal(signal.SIGUSR1)
            await eventually(lambda: log.exists(), within=2)  # reopened on the writer thread
            assert await status(session, f"{gateway.url}/echo/after") == 200
            await eventually(lambda: access_paths(log) == ["/echo/after"], within=2)
        code = await gateway.stop()
    finally:
        await gateway.kill()

    assert access_paths(rotated) == ["/echo/before"], gateway.output()
    assert access_paths(log) == ["/echo/after"]
    assert code == 0


async def test_the_supervisor_relays_sigusr1_and_every_worker_reopens_its_access_log(
    tmp_path: Path, echo: TestServer
) -> None:
    config, log, rotated = tmp_path / "routes.yaml", tmp_path / "access.log", tmp_path / "old.log"
    write_routes(config, f"{ROUTES}access_log: {log}\n", echo)
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
        async with aiohttp.ClientSession(connector=connector) as session:
            assert await status(session, f"{gateway.url}/echo/before") == 200
            await eventually(lambda: access_paths(log) == ["/echo/before"], within=2)
            log.rename(rotated)
            gateway.send_signal(signal.SIGUSR1)
            await eventually(lambda: gateway.output().count("access log reopened") == 2, within=5)
            codes = [await status(session, f"{gateway.url}/echo/{i}") for i in range(20)]
            await eventually(lambda: len(access_paths(log)) == 20, within=2)
        code = await gateway.stop()
    finally:
        await gateway.kill()

    assert set(codes) == {200}
    assert access_paths(rotated) == ["/echo/before"], gateway.output()
    assert sorted(access_paths(log)) == sorted(f"/echo/{i}" for i in range(20))
    assert code == 0


async def launch(config: Path, workers: int) -> GatewayProcess:
    """Like GatewayProcess.start, without waiting for it to be ready."""
    port, admin_port = free_port(), free_port()
    log = config.with_name(f"gateway.{port}.log")
    args = ["--config", str(config), "--listen", f"127.0.0.1:{port}"]
    args += ["--admin", f"127.0.0.1:{admin_port}", "--workers", str(workers)]
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args,
            stdout=sink, stderr=sink, cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip
    return GatewayProcess(process, port, admin_port, log)


async def test_sighup_while_workers_start_kills_no_worker_and_the_group_stays_up(
    tmp_path: Path, echo: TestServer
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, ROUTES, echo)
    gateway = await launch(config, workers=2)
    try:
        # The supervisor handles SIGHUP once it says it supervises; its workers are starting.
        await eventually(lambda: "supervising 2 workers" in gateway.output(), within=15)
        sent, deadline = 0, time.monotonic() + 15
        while gateway.listening() < 2 and gateway.process.returncode is None:
            assert time.monotonic() < deadline, gateway.output()
            gateway.send_signal(signal.SIGHUP)  # relayed to workers that are still starting
            sent += 1
            await asyncio.sleep(POLL)
        await gateway.wait_ready(workers=2)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            codes = [await status(session, f"{gateway.url}/echo/{i}") for i in range(20)]
        running = gateway.process.returncode is None
        code = await gateway.stop()
    finally:
        await gateway.kill()

    assert sent > 0
    assert running, gateway.output()
    assert set(codes) == {200}
    assert "exited with" not in gateway.output()  # no worker died
    assert code == 0


@pytest.mark.parametrize(
    ("template", "code", "expected"),
    [
        (ROUTES, 0, ["{file}: ok (1 routes)"]),
        (
            ROUTES.replace("/echo", "echo").replace("$ECHO", "ftp://x"),
            1,
            [
                "{file}:3:20: services.echo.targets.0: bad target URL: "
                "the scheme must be http or https",
                "{file}:5:13: routes.0.prefix: must start with '/'",
            ],
        ),
    ],
    ids=["good file exits 0", "bad file prints FILE:LINE:COL errors and exits 1"],
)
async def test_check_validates_the_file_and_exits_0_or_1(
    tmp_path: Path, template: str, code: int, expected: list[str]
) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(template.replace("$ECHO", "http://127.0.0.1:9"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--check", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO_ROOT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), EXIT_TIMEOUT_SECONDS)

    assert process.returncode == code
    assert out.decode().splitlines() == [line.format(file=config) for line in expected]
