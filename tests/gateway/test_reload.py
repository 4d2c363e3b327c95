"""Hot reload in one process: the gateway's lifecycle watches routes.yaml; an edit is served
within 2 s, a bad edit keeps the old table and shows its errors, in-flight requests finish on
the table they started with, and unchanged services keep their pools."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable
from functools import partial
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load, load_text
from gateway.runtime.reload import Signature, file_signature
from gateway.runtime.state import Gateway
from gateway.servers.admin import create_admin_app
from gateway.servers.public import create_app
from gateway.upstream.breaker import Circuit
from tests.gateway.conftest import GatewayClient, base_url
from tests.polling import always
from tests.polling import eventually as poll_eventually
from tests.resilience_upstreams import Target, serve
from tests.upstreams import make_gated_app, make_held_stream_app

RELOAD_DEADLINE = 2.0  # seconds: the contract's promise for an edited file
eventually = partial(poll_eventually, within=RELOAD_DEADLINE)

ROUTES = """version: 1
services:
  echo: {targets: [$ECHO]}
  gated: {targets: [$GATED]}
routes:
  - prefix: /echo
    service: echo
  - prefix: /gated
    service: gated
"""
ADDED = (
    ROUTES
    + """  - prefix: /added
    service: echo
"""
)
BAD_KEY = ROUTES.replace("    service: echo\n", "    service: echo\n    bogus: 1\n", 1)
WITHOUT_GATED = """version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - prefix: /echo
    service: echo
"""


class Running:
    """A gateway served from a file, its public and admin clients, and its upstreams' gate."""

    def __init__(
        self,
        path: Path,
        gateway: Gateway,
        public: GatewayClient,
        admin: GatewayClient,
        upstreams: dict[str, str],
        gate: asyncio.Event,
    ) -> None:
        self.path, self.gateway, self.public, self.admin = path, gateway, public, admin
        self.upstreams = upstreams
        self.gate = gate

    def text(self, template: str) -> str:
        for name, url in self.upstreams.items():
            template = template.replace(f"${name}", url)
        return template

    async def edit(self, template: str) -> None:
        """Rewrite the file in place, as most editors and `cat >` do (off the event loop)."""
        await asyncio.to_thread(self.path.write_text, self.text(template))

    async def config(self) -> dict[str, object]:
        body: dict[str, object] = await (await self.admin.get("/config")).json()
        return body

    async def metric(self, name: str, **labels: str) -> float:
        text = await (await self.admin.get("/metrics")).text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        raise AssertionError(f"no sample {name}{labels}")


@pytest.fixture
async def running(
    tmp_path: Path,
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    echo_upstream: TestServer,
) -> Running:
    gate = asyncio.Event()
    gated = await aiohttp_server(make_gated_app(gate))
    upstreams = {"ECHO": base_url(echo_upstream), "GATED": base_url(gated)}
    path = tmp_path / "routes.yaml"
    result_text = ROUTES
    for name, url in upstreams.items():
        result_text = result_text.replace(f"${name}", url)
    await asyncio.to_thread(path.write_text, result_text)
    result = await asyncio.to_thread(load, path)
    assert result.config is not None, [str(e) for e in result.errors]
    gateway = Gateway(result.config, str(path))
    public = await aiohttp_client(create_app(gateway))  # its lifecycle starts the Reloader
    admin = await aiohttp_client(create_admin_app(gateway))
    return Running(path, gateway, public, admin, upstreams, gate)


async def status_of(client: GatewayClient, path: str) -> int:
    async with client.get(path) as resp:
        await resp.read()
        return resp.status


async def test_an_added_route_is_served_within_2s_without_dropping_a_concurrent_request(
    running: Running,
) -> None:
    answered: list[int] = []
    stop = asyncio.Event()

    async def load_loop() -> None:
        while not stop.is_set():
            answered.append(await status_of(running.public, "/echo/x"))

    workers = [asyncio.create_task(load_loop()) for _ in range(4)]
    try:
        await eventually(lambda: len(answered) > 10)
        await running.edit(ADDED)

        took = await eventually(lambda: _is(status_of(running.public, "/added/x"), 200))
        count = len(answered)
        await eventually(lambda: len(answered) > count + 10)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert took < RELOAD_DEADLINE
    assert set(answered) == {200}
    assert await running.metric("gateway_config_reloads_total", result="applied") == 1


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def test_an_invalid_edit_keeps_the_old_table_and_shows_file_line_col_errors(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.config")
    serving = running.gateway.config.version_hash

    await running.edit(BAD_KEY)
    await eventually(lambda: _last_reload_ok(running, False))
    body = await running.config()

    expected = f"{running.path}:8:5: routes.0.bogus: unknown key 'bogus'"
    assert body["version_hash"] == serving
    last = body["last_reload"]
    assert isinstance(last, dict)
    assert (last["result"], last["errors"]) == ("rejected", [expected])
    assert f"reload rejected: {expected}" in caplog.messages
    assert await status_of(running.public, "/echo/x") == 200
    assert await running.metric("gateway_config_reloads_total", result="rejected") == 1
    assert await running.metric("gateway_config_last_reload_successful") == 0


async def test_fixing_a_rejected_file_applies_it_and_clears_the_errors(running: Running) -> None:
    await running.edit(BAD_KEY)
    await eventually(lambda: _last_reload_ok(running, False))

    await running.edit(ADDED)
    await eventually(lambda: _last_reload_ok(running, True))
    body = await running.config()

    assert body["text"] == running.text(ADDED)
    last = body["last_reload"]
    assert isinstance(last, dict)
    assert (last["result"], last["errors"]) == ("applied", [])
    assert await status_of(running.public, "/added/x") == 200
    assert await running.metric("gateway_config_last_reload_successful") == 1


async def _last_reload_ok(running: Running, ok: bool) -> bool:
    last = (await running.config())["last_reload"]
    assert isinstance(last, dict)
    return bool(last["ok"] is ok and last["version_hash"] == await _sha(running.path))


async def _sha(path: Path) -> str:
    return hashlib.sha256(await asyncio.to_thread(path.read_bytes)).hexdigest()


async def test_an_in_flight_request_finishes_on_the_table_it_started_with(
    running: Running,
) -> None:
    removed = running.gateway.services["gated"]
    pending = asyncio.ensure_future(running.public.get("/gated/wait"))
    await eventually(lambda: removed.targets[0].in_flight == 1)

    await running.edit(WITHOUT_GATED)
    await eventually(lambda: _last_reload_ok(running, True))
    assert await status_of(running.public, "/gated/other") == 404  # the new table
    assert not removed.session.closed  # its request is still running
    running.gate.set()
    resp = await pending

    assert (resp.status, await resp.text()) == (200, "released")
    await eventually(lambda: removed.session.closed)


async def test_an_unchanged_service_keeps_its_pool_and_a_changed_one_gets_a_new_one(
    running: Running,
) -> None:
    assert await status_of(running.public, "/echo/x") == 200
    echo, gated = running.gateway.services["echo"], running.gateway.services["gated"]
    pool = echo.session
    echo.targets[0].healthy = False  # as an active health check would have decided

    await running.edit(
        ADDED.replace("gated: {targets: [$GATED]}", "gated: {targets: [$GATED], retries: 1}")
    )
    await eventually(lambda: running.gateway.services["gated"] is not gated)

    assert running.gateway.services["echo"] is echo
    assert echo.session is pool
    assert not pool.closed
    assert echo.targets[0].healthy is False
    assert running.gateway.services["gated"].config.retries == 1


async def test_request_reload_reloads_at_once_even_when_the_file_looks_unchanged(
    running: Running,
) -> None:
    await running.edit(ADDED)
    await eventually(lambda: _is(status_of(running.public, "/added/x"), 200))
    before = await asyncio.to_thread(running.path.stat)
    signature = await asyncio.to_thread(file_signature, running.path)

    # Same size, same inode, old mtime restored: a poll cannot tell that the file changed.
    def rewrite_unseen() -> Signature:  # one thread call: the poller sees no step between
        running.path.write_text(running.text(ADDED.replace("/added", "/addeD")))
        os.utime(running.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return file_signature(running.path)

    assert await asyncio.to_thread(rewrite_unseen) == signature
    running.gateway.request_reload()  # what SIGHUP calls

    await eventually(lambda: _is(status_of(running.public, "/addeD/x"), 200), within=1.0)
    assert await status_of(running.public, "/added/x") == 404


async def test_a_deleted_file_is_rejected_and_the_old_table_keeps_serving(
    running: Running,
) -> None:
    await asyncio.to_thread(running.path.unlink)

    await eventually(lambda: _last_reload_errors(running))
    last = (await running.config())["last_reload"]

    assert isinstance(last, dict)
    assert last["errors"] == [
        f"{running.path}:1:1: <root>: cannot read file: No such file or directory"
    ]
    assert await status_of(running.public, "/echo/x") == 200


async def _last_reload_errors(running: Running) -> bool:
    last = (await running.config())["last_reload"]
    assert isinstance(last, dict)
    return bool(last["errors"])


async def test_a_rejected_value_from_the_environment_is_never_echoed(
    running: Running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    monkeypatch.setenv("GATEWAY_TEST_RETRIES", "s3cr3t-value")

    await running.edit(
        ROUTES.replace("{targets: [$ECHO]}", "{targets: [$ECHO], retries: ${GATEWAY_TEST_RETRIES}}")
    )
    await eventually(lambda: _last_reload_errors(running))

    assert "s3cr3t-value" not in caplog.text
    assert "s3cr3t-value" not in await (await running.admin.get("/config")).text()
    assert "${GATEWAY_TEST_RETRIES}" in await asyncio.to_thread(running.path.read_text)


async def test_an_edit_made_before_the_watch_starts_is_still_applied(
    tmp_path: Path, aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    path = tmp_path / "routes.yaml"
    url = base_url(echo_upstream)
    first = WITHOUT_GATED.replace("$ECHO", url)
    await asyncio.to_thread(path.write_text, first)
    result = await asyncio.to_thread(load, path)
    assert result.config is not None
    edited = first + "  - prefix: /late\n    service: echo\n"
    await asyncio.to_thread(path.write_text, edited)  # before the gateway watches the file

    public = await aiohttp_client(create_app(Gateway(result.config, str(path))))

    await eventually(lambda: _is(status_of(public, "/late/x"), 200))


def test_the_version_hash_is_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    raw = WITHOUT_GATED.replace("$ECHO", "http://127.0.0.1:1").replace("\n", "\r\n").encode()
    path.write_bytes(raw)

    result = load(path)

    assert result.config is not None
    assert result.config.version_hash == hashlib.sha256(raw).hexdigest()


def svc(service: str, limits: str = "") -> str:
    """routes.yaml text: service `svc` (a YAML flow mapping) behind /svc, a 200 ms grace."""
    return (
        f"version: 1\nlimits: {{shutdown_grace: 200ms{limits}}}\nservices:\n  svc: {service}\n"
        "routes:\n  - {prefix: /svc, service: svc, strip_prefix: true}\n"
    )


async def start_gateway(aiohttp_client: AiohttpClient, text: str) -> tuple[Gateway, GatewayClient]:
    result = load_text(text, "routes.yaml", environ={})
    assert result.config is not None, [str(e) for e in result.errors]
    gateway = Gateway(result.config)
    return gateway, await aiohttp_client(create_app(gateway))


def apply_text(gateway: Gateway, text: str) -> None:
    result = load_text(text, "routes.yaml", environ={})
    assert gateway.apply(result), [str(e) for e in result.errors]


@pytest.mark.parametrize("retries", [0, 1])
async def test_an_upload_still_running_at_a_reload_finishes_on_its_old_service(
    retries: int, aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    url = base_url(echo_upstream)
    gateway, client = await start_gateway(
        aiohttp_client, svc(f"{{targets: [{url}], retries: {retries}}}")
    )
    old = gateway.services["svc"]
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"PUT /svc/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
        + b"p" * 500
    )
    await writer.drain()
    await eventually(lambda: gateway.metrics.active == 1)  # the PUT is in, half its body too

    apply_text(gateway, svc(f"{{targets: [{url}], retries: {retries + 1}}}"))  # one field edited
    assert gateway.services["svc"] is not old
    await always(lambda: not old.closed, during=0.5)  # longer than shutdown_grace
    writer.write(b"p" * 500)
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()

    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"body_length": 1000' in answer
    await eventually(lambda: old.closed)  # and once it is done, the old pool is closed


async def test_streams_and_websockets_outlive_shutdown_grace_when_a_reload_edits_their_service(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    gate = asyncio.Event()
    url = base_url(await aiohttp_server(make_held_stream_app(gate)))
    gateway, client = await start_gateway(aiohttp_client, svc(f"{{targets: [{url}]}}"))
    old = gateway.services["svc"]
    events = await client.get("/svc/events")
    assert await events.content.readline() == b"data: first\n"
    ws = await client.ws_connect("/svc/ws")
    await ws.send_str("before")
    assert await ws.receive_str() == "echo:before"

    apply_text(gateway, svc(f"{{targets: [{url}], retries: 1}}"))
    await always(lambda: not old.closed, during=0.5)  # longer than shutdown_grace
    gate.set()
    rest = await events.content.read()
    await ws.send_str("after")

    assert await ws.receive_str() == "echo:after"
    assert rest == b"\ndata: last\n\n"
    await ws.close()
    await eventually(lambda: old.closed)


async def test_a_stream_on_a_replaced_service_is_cut_after_drain_timeout(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    gate = asyncio.Event()
    url = base_url(await aiohttp_server(make_held_stream_app(gate)))
    limits = ", drain_timeout: 300ms"
    gateway, client = await start_gateway(aiohttp_client, svc(f"{{targets: [{url}]}}", limits))
    old = gateway.services["svc"]
    events = await client.get("/svc/events")
    assert await events.content.readline() == b"data: first\n"

    apply_text(gateway, svc(f"{{targets: [{url}], retries: 1}}", limits))
    await eventually(lambda: old.closed)
    with pytest.raises(aiohttp.ClientPayloadError):  # a broken body, not one that looks whole
        await events.content.read()
    gate.set()


async def test_targets_a_reload_kept_keep_their_health_and_circuit_state(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    a, b, c = Target("a"), Target("b", "reset"), Target("c")
    url_a, url_b, url_c = await serve(aiohttp_server, a, b, c)
    settings = (
        "health_check: {path: /healthz, interval: 20ms, unhealthy_threshold: 1}, "
        "circuit_breaker: {failures: 1, open_for: 30s}"
    )
    gateway, client = await start_gateway(
        aiohttp_client, svc(f"{{targets: [{url_a}, {url_b}], {settings}}}")
    )
    a.health_status = 503
    await poll_eventually(lambda: not gateway.services["svc"].targets[0].healthy)
    assert await status_of(client, "/svc/x") == 502  # b resets: its circuit opens
    assert gateway.services["svc"].targets[1].breaker.state is Circuit.OPEN

    apply_text(gateway, svc(f"{{targets: [{url_a}, {url_b}], retries: 1, {settings}}}"))
    edited = gateway.services["svc"]

    assert edited.config.retries == 1
    assert (edited.targets[0].healthy, edited.targets[1].breaker.state) == (False, Circuit.OPEN)
    assert await status_of(client, "/svc/x") == 503  # neither target gets traffic yet
    assert a.total + b.total == 1

    apply_text(gateway, svc(f"{{targets: [{url_a}, {url_c}], retries: 1, {settings}}}"))
    moved = gateway.services["svc"]

    assert moved.targets[0].healthy is False  # same URL: still down
    assert moved.targets[1].breaker.state is Circuit.CLOSED  # a new URL starts afresh
    assert await status_of(client, "/svc/x") == 200
    assert c.total == 1


async def test_shutdown_cancels_the_draining_of_replaced_services_and_closes_them(
    running: Running,
) -> None:
    removed = running.gateway.services["gated"]
    pending = asyncio.ensure_future(running.public.get("/gated/wait"))
    await eventually(lambda: removed.targets[0].in_flight == 1)
    await running.edit(WITHOUT_GATED)
    await eventually(lambda: running.gateway.services.get("gated") is None)
    assert _draining() != []

    await running.gateway.close()

    assert _draining() == []
    assert removed.closed
    running.gate.set()
    with contextlib.suppress(aiohttp.ClientError):
        (await pending).close()


def _draining() -> list[asyncio.Task[object]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "Gateway._retire"
    ]
