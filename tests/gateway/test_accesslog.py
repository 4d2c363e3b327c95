"""Access lines and event logs: one JSON object a line, every CONTRACT §5 field, written off the
event loop, and nothing queued is lost when the writer stops."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from gateway.ops.accesslog import (
    AccessLog,
    JsonFormatter,
    LogOutput,
    access_line,
    access_logger,
    configure_logging,
    drops,
)
from gateway.servers.admin import create_admin_app
from gateway.servers.public import create_app
from tests.gateway.conftest import compile_gateway
from tests.polling import eventually

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

    assert set(line) == CONTRACT_FIELDS | {"calls"}  # and the list of upstream calls
    calls = line["calls"]
    assert isinstance(calls, list)
    assert calls == [
        {
            "service": "echo",
            "kind": "forward",
            "target": "echo#0",
            "attempts": 1,
            "ms": line["upstream_ms"],
            "status": 200,
            "outcome": "ok",
        }
    ]
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

    from gateway.ops.accesslog import _quiet_bad_requests

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


@contextlib.asynccontextmanager
async def installed_logging(
    stdout: TextIO, access_log: str | None = None, **options: Any
) -> AsyncIterator[LogOutput]:
    """configure_logging() with `stdout` as standard output (opened and stopped on a thread:
    that is blocking I/O); the test's own logging comes back afterwards."""
    root, aiohttp_access = logging.getLogger(), logging.getLogger("aiohttp.access")
    saved = (sys.stdout, root.handlers[:], root.level, access_logger.handlers[:])
    saved_flags = (access_logger.propagate, aiohttp_access.disabled)
    sys.stdout = stdout
    try:
        output = await asyncio.to_thread(configure_logging, access_log, **options)
        try:
            yield output
        finally:
            await asyncio.to_thread(output.stop)
    finally:
        sys.stdout, root.handlers[:], access_logger.handlers[:] = saved[0], saved[1], saved[3]
        root.setLevel(saved[2])
        access_logger.propagate, aiohttp_access.disabled = saved_flags


def paused_fifo(path: Path) -> int:
    """A named pipe with a reader that reads nothing until told: once the pipe buffer (64 KiB)
    is full, whoever writes to it blocks. Returns the reader's descriptor."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write succeeds


def read_to_end(fd: int) -> str:
    """Resume a paused reader: read everything until the last writer closes its end."""
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


DROPPED = re.compile(r"dropped (\d+) access and (\d+) event lines")


def drop_warnings(text: str) -> list[tuple[datetime, int, int]]:
    """(time, access lines, event lines) of each "lines dropped" warning in `text`."""
    found = []
    for line in text.splitlines():
        event = json.loads(line)
        if event.get("level") == "warning" and (match := DROPPED.search(event["message"])):
            at = datetime.fromisoformat(event["time"])
            found.append((at, int(match[1]), int(match[2])))
    return found


async def test_a_stuck_access_log_drops_and_counts_lines_while_the_loop_keeps_answering(
    tmp_path: Path, aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    fifo, stdout, interval, backlog = tmp_path / "access.fifo", io.StringIO(), 0.3, 50
    reader = await asyncio.to_thread(paused_fifo, fifo)
    dropped_before = drops.total("access")
    slowest, backlogs, sent = 0.0, [], 0
    gateway = compile_gateway(ROUTES, echo=echo_upstream)
    gateway.access_log = AccessLog(backlog=backlog)
    async with installed_logging(stdout, str(fifo), report_interval=interval):
        try:
            client = await aiohttp_client(create_app(gateway))
            admin = await aiohttp_client(create_admin_app(gateway))
            started = time.monotonic()

            async def client_loop() -> None:
                nonlocal slowest, sent
                # Until three warnings (three intervals at least), or a deadline.
                while len(drop_warnings(stdout.getvalue())) < 3 and time.monotonic() < started + 10:
                    asked = time.monotonic()
                    assert (await client.get("/api/inventory/x")).status == 200
                    slowest = max(slowest, time.monotonic() - asked)
                    backlogs.append(gateway.access_log.backlog)
                    sent += 1

            await asyncio.gather(*(client_loop() for _ in range(4)))
            elapsed = time.monotonic() - started
            serving = drop_warnings(stdout.getvalue())
            scrape = await (await admin.get("/metrics")).text()
        finally:  # read the pipe again, or stopping would wait for the stuck writer forever
            drained = asyncio.ensure_future(asyncio.to_thread(read_to_end, reader))
            await asyncio.to_thread(gateway.access_log.stop)
    written = len((await drained).splitlines())  # the output was stopped: the writer closed

    assert slowest < 2.0  # each request answered at once while the writer was stuck
    assert max(backlogs) <= backlog  # memory bounded: never more lines waiting than that
    dropped = drops.total("access") - dropped_before
    assert dropped > 0
    assert written + dropped == sent  # every line was either written or counted as dropped
    assert metric(scrape, "gateway_log_lines_dropped_total", stream="access") > 0
    assert 3 <= len(serving) <= elapsed / interval + 1
    gaps = [(b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(serving)]
    assert min(gaps) >= interval - 0.002, gaps  # the times have millisecond resolution
    warnings = drop_warnings(stdout.getvalue())  # one more when the output stopped
    assert sum(access for _, access, _ in warnings) == dropped  # the warnings say it all


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_event_logs_to_a_stuck_stdout_drop_beyond_the_bound_and_are_reported() -> None:
    read_end, write_end = os.pipe()
    stdout = os.fdopen(write_end, "w")
    dropped_before, count, limit = drops.total("event"), 5000, 50
    backlogs = []
    async with installed_logging(stdout, event_backlog=limit, report_interval=0.2) as output:
        try:
            events = logging.getLogger("gateway.test")
            for i in range(count):  # ~100 bytes a line: the pipe fills after some 600 of them
                events.info("event %d", i)
                backlogs.append(output.backlog)
            dropped = drops.total("event") - dropped_before
        finally:  # read the pipe again, or stopping would wait for the stuck writer forever
            drained = asyncio.ensure_future(asyncio.to_thread(read_to_end, read_end))
    await asyncio.to_thread(stdout.close)  # the StreamHandler leaves its stream open
    text = await drained

    assert max(backlogs) <= limit
    assert dropped > 0
    written = [line for line in text.splitlines() if '"logger":"gateway.test"' in line]
    assert len(written) + dropped == count
    warnings = drop_warnings(text)  # written once the pipe was read again, none lost
    assert warnings
    assert sum(event for _, _, event in warnings) == dropped


async def read(path: Path) -> str:
    return await asyncio.to_thread(path.read_text)


async def holds_text(path: Path, text: str) -> bool:
    return text in await read(path)


async def test_reopen_moves_the_access_log_to_a_new_file_at_the_same_path(
    tmp_path: Path, aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    path, rotated, stdout = tmp_path / "access.log", tmp_path / "access.log.1", io.StringIO()
    async with installed_logging(stdout, str(path)):
        gateway = compile_gateway(ROUTES, echo=echo_upstream)
        client = await aiohttp_client(create_app(gateway))
        assert (await client.get("/api/inventory/before")).status == 200
        await eventually(lambda: holds_text(path, "before"), within=2)
        await asyncio.to_thread(path.rename, rotated)  # what logrotate does
        gateway.access_log.reopen()
        gateway.access_log.reopen()  # asked twice before the writer got to it: one reopen
        await eventually(lambda: "access log reopened" in stdout.getvalue(), within=2)
        assert (await client.get("/api/inventory/after")).status == 200
        await asyncio.to_thread(gateway.access_log.stop)

    old = [json.loads(line)["path"] for line in (await read(rotated)).splitlines()]
    new = [json.loads(line)["path"] for line in (await read(path)).splitlines()]
    assert (old, new) == (["/api/inventory/before"], ["/api/inventory/after"])
    assert stdout.getvalue().count("access log reopened") == 1


async def test_an_access_log_that_cannot_be_reopened_keeps_writing_to_the_old_file(
    tmp_path: Path, aiohttp_client: AiohttpClient, echo_upstream: TestServer
) -> None:
    logs, stdout = tmp_path / "logs", io.StringIO()
    await asyncio.to_thread(logs.mkdir)
    async with installed_logging(stdout, str(logs / "access.log")):
        gateway = compile_gateway(ROUTES, echo=echo_upstream)
        client = await aiohttp_client(create_app(gateway))
        await asyncio.to_thread(logs.rename, tmp_path / "moved")  # the directory is gone
        gateway.access_log.reopen()
        await eventually(lambda: "cannot reopen" in stdout.getvalue(), within=2)
        assert (await client.get("/api/inventory/after")).status == 200
        await asyncio.to_thread(gateway.access_log.stop)

    [line] = (await read(tmp_path / "moved" / "access.log")).splitlines()
    assert json.loads(line)["path"] == "/api/inventory/after"
    [error] = [json.loads(e) for e in stdout.getvalue().splitlines() if "cannot reopen" in e]
    assert error["level"] == "error"
    assert "still writing to the old file" in error["message"]


def line_time(at: float) -> str:
    line = access_line(
        at, "rid", "0" * 32, "c", "GET", "/", "", "", "", 200, 0, 0, 1.0, None, "", "", 0
    )  # fmt: skip
    value = json.loads(line)["time"]
    assert isinstance(value, str)
    return value


def test_line_times_are_right_within_a_millisecond_across_milliseconds_and_seconds() -> None:
    # The text of the last millisecond is kept: the same millisecond, the next one and the
    # next second must each read as themselves, in whatever order they come.
    assert line_time(1.5) == "1970-01-01T00:00:01.500+00:00"
    assert line_time(1.5004) == "1970-01-01T00:00:01.500+00:00"
    assert line_time(1.5011) == "1970-01-01T00:00:01.501+00:00"
    assert line_time(1.9995) == "1970-01-01T00:00:01.999+00:00"
    assert line_time(2.0001) == "1970-01-01T00:00:02.000+00:00"
    assert line_time(1.5) == "1970-01-01T00:00:01.500+00:00"  # back again: not the cached one
    now = time.time()
    assert datetime.fromisoformat(line_time(now)).timestamp() == pytest.approx(now, abs=0.001)


def test_the_parts_a_line_keeps_for_reuse_stay_bounded() -> None:
    from gateway.http.exchange import UpstreamCall
    from gateway.ops.accesslog import _FRAGMENTS_MAX, _call_parts, _routing

    for i in range(_FRAGMENTS_MAX + 100):  # more names than a config could ever hold
        call = UpstreamCall(f"s{i}", "forward", f"s{i}#0", 1, 1.0, 200, "ok")
        line = access_line(
            1.5, "rid", "0" * 32, "c", "GET", "/", f"routes.{i}", f"s{i}", f"s{i}#0", 200, 0, 0,
            1.0, 1.0, "", "", 0, (call,),
        )  # fmt: skip
        parsed = json.loads(line)
        assert (parsed["route"], parsed["calls"][0]["service"]) == (f"routes.{i}", f"s{i}")
    assert len(_routing) <= _FRAGMENTS_MAX
    assert len(_call_parts) <= _FRAGMENTS_MAX
