"""Tracing in a real `python -m gateway --workers 2`: each worker exports through an export
process of its own (gateway/ops/spanexport.py); a SIGTERM sends the last spans to the
collector and stops every export process; a worker killed with SIGKILL takes its export
process with it (which does not wait to be told)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from pytest_aiohttp import AiohttpServer

from tests.polling import eventually
from tests.processes.procs import GatewayProcess
from tests.upstreams import make_echo_app

ROUTES = """version: 1
tracing: {otlp_endpoint: "$COLLECTOR", sample_ratio: 1.0, service_name: edge}
services:
  echo: {targets: [$ECHO]}
routes:
  - {prefix: /echo, service: echo}
"""
REQUESTS = 40


class Collector:
    def __init__(self) -> None:
        self.names: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.names += [span.name for span in scope_spans.spans]
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


@pytest.fixture
async def collector(aiohttp_server: AiohttpServer) -> tuple[Collector, TestServer]:
    received = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", received.handle)
    return received, await aiohttp_server(app)


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_echo_app())


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def children(parent: int) -> dict[int, bytes]:
    """The processes whose parent is `parent`: pid -> command line."""
    found: dict[int, bytes] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            if int(stat.rsplit(b")", 1)[1].split()[1]) == parent:
                found[int(entry.name)] = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def export_processes(workers: list[int]) -> dict[int, int]:
    """Each worker's export process: worker pid -> its pid."""
    out: dict[int, int] = {}
    for worker in workers:
        for pid, command in children(worker).items():
            if b"gateway.ops.spanexport" in command:
                out[worker] = pid
    return out


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


async def workers_of(gateway: GatewayProcess) -> list[int]:
    """The supervisor's two workers, once both run."""
    pids: list[int] = []

    def two() -> bool:
        pids[:] = [pid for pid, command in children(gateway.process.pid).items() if command]
        return len(pids) == 2

    await eventually(two, within=15)
    return pids


async def test_each_worker_exports_through_its_own_process_and_a_stop_sends_the_last_spans(
    tmp_path: Path, echo: TestServer, collector: tuple[Collector, TestServer]
) -> None:
    received, server = collector
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES.replace("$COLLECTOR", url(server)).replace("$ECHO", url(echo)))
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        workers = await workers_of(gateway)
        exporters: dict[int, int] = {}

        def one_each() -> bool:
            exporters.update(export_processes(workers))
            return len(exporters) == 2

        await eventually(one_each, within=15)
        connector = aiohttp.TCPConnector(force_close=True)  # the kernel spreads connections
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(REQUESTS):
                async with session.get(f"{gateway.url}/echo/{n}") as response:
                    assert response.status == 200
        code = await gateway.stop()  # before the processor's next scheduled export
        await eventually(lambda: all(gone(pid) for pid in exporters.values()), within=15)
    finally:
        await gateway.kill()

    assert code == 0, gateway.output()
    assert len(set(exporters.values())) == 2  # one each, not shared
    assert received.names.count("GET /echo") == REQUESTS, gateway.output()
    assert received.names.count("GET echo") == REQUESTS


async def test_a_worker_killed_with_sigkill_takes_its_export_process_with_it(
    tmp_path: Path, echo: TestServer, collector: tuple[Collector, TestServer]
) -> None:
    _, server = collector
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES.replace("$COLLECTOR", url(server)).replace("$ECHO", url(echo)))
    gateway = await GatewayProcess.start(config, workers=2)
    try:
        workers = await workers_of(gateway)
        exporters: dict[int, int] = {}

        def one_each() -> bool:
            exporters.update(export_processes(workers))
            return len(exporters) == 2

        await eventually(one_each, within=15)
        os.kill(workers[0], signal.SIGKILL)

        await eventually(lambda: gone(exporters[workers[0]]), within=15)
        assert not gone(exporters[workers[1]])  # the other worker's is untouched
        await eventually(lambda: gateway.listening() == 3, within=15)  # its replacement
        code = await gateway.stop()
    finally:
        await gateway.kill()

    assert code == 0, gateway.output()
