"""Access lines and event logs: one JSON object a line, every CONTRACT §5 field, written off the
event loop, and nothing queued is lost when the writer stops."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from gateway.accesslog import JsonFormatter, access_line, access_logger, configure_logging
from gateway.app import create_app
from tests.gateway.conftest import compile_gateway

ROUTES = """
version: 1
services:
  echo: {targets: [$ECHO]}
routes:
  - {prefix: /api/inventory, service: echo, strip_prefix: true}
"""
CONTRACT_FIELDS = {
    "time", "request_id", "trace_id", "client", "method", "path", "route", "service", "target",
    "status", "bytes_in", "bytes_out", "total_ms", "upstream_ms", "consumer", "cache", "retries",
}  # fmt: skip
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Lines(logging.Handler):
    """Collects what reaches the gateway.access logger, optionally holding the writer thread
    at its first line until `release` is set."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        super().__init__()
        self.records: list[dict[str, object]] = []
        self.hold = hold

    def emit(self, record: logging.LogRecord) -> None:
        if self.hold is not None:
            self.hold.wait(timeout=5)
        assert isinstance(record.msg, str)  # a batch: one JSON object a line
        self.records.extend(json.loads(line) for line in record.msg.splitlines())

    async def wait_for(self, count: int, within: float = 2.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + within
        while len(self.records) < count:
            assert time.monotonic() < deadline, f"{len(self.records)} of {count} lines written"
            await asyncio.sleep(0.01)
        return self.records


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    """Access lines at INFO (tests/conftest.py quiets them to WARNING for other tests)."""
    lines = Lines()
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(lines)
    try:
        yield lines
    finally:
        access_logger.removeHandler(lines)


async def test_every_request_writes_one_line_with_every_contract_field(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer, access_lines: Lines
) -> None:
    client = await aiohttp_client(create_app(compile_gateway(ROUTES, echo=echo_upstream)))
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

    resp = await client.post(
        "/api/inventory/devices?token=abc",
        data=b"x" * 300,
        headers={"X-Request-ID": "req-42", "traceparent": traceparent},
    )
    body = await resp.read()
    [line] = await access_lines.wait_for(1)

    assert set(line) == CONTRACT_FIELDS
    assert line["request_id"] == resp.headers["X-Request-ID"] == "req-42"
    assert line["trace_id"] == TRACE_ID
    assert (line["client"], line["method"], line["status"]) == ("127.0.0.1", "POST", 200)
    assert line["path"] == "/api/inventory/devices"  # no query: it may carry a token
    assert (line["route"], line["service"], line["target"]) == ("routes.0", "echo", "echo#0")
    assert line["bytes_in"] == 300
    assert isinstance(line["bytes_out"], int)
    assert line["bytes_out"] >= len(body)
    total, upstream = line["total_ms"], line["upstream_ms"]
    assert isinstance(total, float)
    assert isinstance(upstream, float)
    assert 0 < upstream <= total
    assert (line["consumer"], line["cache"], line["retries"]) == (None, None, 0)
    assert isinstance(line["time"], str)
    assert line["time"].endswith("+00:00")


async def test_a_request_no_route_serves_is_logged_without_route_service_or_target(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer, access_lines: Lines
) -> None:
    client = await aiohttp_client(create_app(compile_gateway(ROUTES, echo=echo_upstream)))

    resp = await client.get("/nowhere/../elsewhere")
    [line] = await access_lines.wait_for(1)

    assert resp.status == 404
    assert line["path"] == "/elsewhere"
    assert (line["route"], line["service"], line["target"], line["upstream_ms"]) == (
        None,
        None,
        None,
        None,
    )
    assert line["status"] == 404


async def test_stopping_the_access_log_writes_every_line_still_queued(
    aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    release = threading.Event()
    lines = Lines(hold=release)
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(lines)
    try:
        gateway = compile_gateway(ROUTES, echo=echo_upstream)
        client = await aiohttp_client(create_app(gateway))
        for _ in range(20):  # the writer is held at the first line: the rest wait in the queue
            assert (await client.get("/api/inventory/x")).status == 200
        assert lines.records == []

        release.set()
        await asyncio.to_thread(gateway.access_log.stop)

        assert len(lines.records) == 20
    finally:
        release.set()
        access_logger.removeHandler(lines)


def test_event_logs_are_json_lines_with_time_level_logger_and_message() -> None:
    record = logging.LogRecord(
        "gateway.config", logging.WARNING, __file__, 1, "reload rejected: %s", ("f:1:2: x",), None
    )

    line = json.loads(JsonFormatter().format(record))

    assert set(line) == {"time", "level", "logger", "message"}
    assert (line["level"], line["logger"]) == ("warning", "gateway.config")
    assert line["message"] == "reload rejected: f:1:2: x"


def test_an_event_with_an_exception_carries_its_traceback_in_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "gateway", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )

    text = JsonFormatter().format(record)

    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]


def test_access_lines_pass_the_formatter_as_they_are() -> None:
    lines = '{"a":1}\n{"a":2}'
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, lines, (), None)

    assert JsonFormatter().format(record) == lines


async def test_configured_output_sends_access_lines_to_a_file_and_events_to_stdout(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aiohttp_client: AiohttpClient,
    echo_upstream: TestServer,
) -> None:
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    root, aiohttp_access = logging.getLogger(), logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, access_logger.handlers[:], aiohttp_access.disabled)
    access_file = tmp_path / "access.log"
    output = await asyncio.to_thread(configure_logging, str(access_file))
    try:
        gateway = compile_gateway(ROUTES, echo=echo_upstream)
        client = await aiohttp_client(create_app(gateway))
        for _ in range(10):
            assert (await client.get("/api/inventory/x")).status == 200
        logging.getLogger("gateway.config").warning("reload rejected: %s", "f:1:2: bad")
        await asyncio.to_thread(gateway.access_log.stop)
    finally:
        await asyncio.to_thread(output.stop)
        root.handlers[:], access_logger.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        access_logger.propagate, aiohttp_access.disabled = True, saved[3]

    text = await asyncio.to_thread(access_file.read_text)
    access = [json.loads(line) for line in text.splitlines()]
    events = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert len(access) == 10
    assert {line["path"] for line in access} == {"/api/inventory/x"}
    assert [e["message"] for e in events] == ["reload rejected: f:1:2: bad"]


def test_an_access_line_stays_valid_ascii_json_whatever_the_client_sent() -> None:
    odd_client = "10.0.0.\udcff"  # a byte that was not UTF-8, as aiohttp hands it over
    odd_path = '/a"b\\c\x01\u00e9'

    line = access_line(
        1.5, "rid", "0" * 32, odd_client, "GET", odd_path, "", "", "", 404, 0, 10, 1.0,
        None, "", "", 0,
    )  # fmt: skip

    assert line.isascii()
    parsed = json.loads(line)
    assert (parsed["client"], parsed["path"], parsed["route"]) == (odd_client, odd_path, None)
    assert parsed["time"] == "1970-01-01T00:00:01.500+00:00"


def test_a_malformed_request_is_not_logged_as_an_error_with_a_traceback() -> None:
    from aiohttp.http_exceptions import BadStatusLine

    from gateway.accesslog import _quiet_bad_requests

    try:
        raise BadStatusLine("GARBAGE")
    except BadStatusLine:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
            sys.exc_info(),
        )  # fmt: skip

    kept = _quiet_bad_requests(record)

    assert not kept  # dropped unless aiohttp.server is at DEBUG
    assert (record.levelname, record.exc_info) == ("DEBUG", None)
