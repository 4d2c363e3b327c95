"""Log output: one JSON object a line, for access lines and for the gateway's own events.

Nothing here writes on the event loop. An access line is made on the loop when its request
ends (one f-string, its repeating parts looked up) and lines are handed over in batches to one
background thread that joins and writes them; event logs (gateway.config, gateway.upstream,
...) go through a `QueueHandler` to a second thread. Both
threads write through the same handler, so lines never interleave, and both drain their queues
on stop, so no line is lost at shutdown.

Both queues are bounded. When a writer cannot keep up (a full disk, a stdout pipe nobody
reads), the newest lines are dropped and counted, per stream, instead of blocking the loop or
growing memory: `gateway_log_lines_dropped_total` exports the counts, and the event-log thread
writes one warning per DROP_REPORT_INTERVAL saying how many went, itself, so that warning never
waits in (or is dropped from) a full queue. SIGUSR1 asks the access-log thread to reopen its
file, for logrotate.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Final, Protocol

from aiohttp.http_exceptions import HttpProcessingError

from gateway.http.exchange import Exchange, UpstreamCall

access_logger = logging.getLogger("gateway.access")
logger = logging.getLogger(__name__)
_STOP: Final = object()
_REOPEN: Final = object()
JOIN_TIMEOUT: Final = 5.0  # seconds stop() waits for a writer thread to drain its queue
ACCESS_BACKLOG: Final = 20_000  # access lines waiting for their writer, at most (~10 MB)
EVENT_BACKLOG: Final = 5_000  # event records waiting for their writer, at most
DROP_REPORT_INTERVAL: Final = 10.0  # seconds: at most one "log lines dropped" warning this often
STREAMS: Final = ("access", "event")


class Requested(Protocol):
    """What an access line reads of the request beside its Exchange (an aiohttp request, or
    the hit lane's view of a parsed message: servers/hitlane.py)."""

    @property
    def method(self) -> str: ...

    @property
    def remote(self) -> str | None: ...


class Drops:
    """Lines dropped because their writer fell behind, per stream, since the process started.

    Any thread may drop an event record, and the event loop must never wait for a lock, so each
    thread adds to a cell of its own (one writer per cell: no lost update) and readers sum the
    cells."""

    def __init__(self) -> None:
        self._cells: dict[tuple[int, str], list[int]] = {}

    def add(self, stream: str, count: int = 1) -> None:
        key = (threading.get_ident(), stream)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = [0]
        cell[0] += count

    def total(self, stream: str) -> int:
        return sum(cell[0] for (_, name), cell in list(self._cells.items()) if name == stream)


drops = Drops()  # this process's counts: metrics.py exports them, the event writer reports them


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """Access records are already JSON lines and pass as they are; a dict message is the line
    itself; anything else is wrapped as {time, level, logger, message}."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == access_logger.name and isinstance(record.msg, str):
            return record.msg
        if isinstance(record.msg, dict):
            return json.dumps(record.msg, separators=(",", ":"), default=str)
        line = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed request (a bad request line, a header too long...) at
    ERROR with a traceback: any client could flood the log. Keep one DEBUG line instead."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args, record.exc_info = "malformed request: %s", (error.message,), None
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
    return True


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: the queue is in-process, so nothing
    needs pickling, and the exception is formatted on the writer thread, not the loop. When
    `limit` records are already waiting, the record is dropped and counted instead."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | object], limit: int) -> None:
        super().__init__(records)
        self.records = records
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if self.records.qsize() >= self.limit:
            drops.add("event")
        else:
            super().emit(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        if not isinstance(record.msg, dict):
            record.msg, record.args = record.getMessage(), None  # freeze the arguments now
        return record


class _EventWriter:
    """The thread that writes event records, and reports dropped lines: it looks at the counts
    every second (or `interval`, if shorter), warns at most once per `interval`, and once more
    when it stops. The warning goes straight to the handler, never through the bounded queue."""

    def __init__(
        self,
        records: queue.SimpleQueue[logging.LogRecord | object],
        out: logging.Handler,
        interval: float,
    ) -> None:
        self._records = records
        self._out = out
        self._interval = interval
        self._reported = {stream: drops.total(stream) for stream in STREAMS}
        self._next_look = 0.0  # monotonic time of the next look at the drop counts
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._records.put(_STOP)  # past the bound: stopping is never dropped
        self._thread.join(timeout=JOIN_TIMEOUT)

    def _run(self) -> None:
        wait = min(self._interval, 1.0)
        while True:
            try:
                record: logging.LogRecord | object = self._records.get(timeout=wait)
            except queue.Empty:
                record = None
            if record is _STOP:
                break
            if isinstance(record, logging.LogRecord):
                self._out.handle(record)
            if (now := time.monotonic()) >= self._next_look:
                self._next_look = now + (self._interval if self._report() else wait)
        self._report()

    def _report(self) -> bool:
        """Write the warning if lines were dropped since the last one; say whether it did."""
        totals = {stream: drops.total(stream) for stream in STREAMS}
        dropped = {stream: totals[stream] - self._reported[stream] for stream in STREAMS}
        if not any(dropped.values()):
            return False
        self._reported = totals
        message = (
            "log writer fell behind: dropped %d access and %d event lines since the last report"
            " (gateway_log_lines_dropped_total)"
        )
        args = (dropped["access"], dropped["event"])
        self._out.handle(
            logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, args, None)
        )
        return True


class LogOutput:
    """The installed JSON output; `stop()` writes what is still queued and restores logging."""

    def __init__(
        self,
        writer: _EventWriter,
        records: queue.SimpleQueue[logging.LogRecord | object],
        handlers: list[logging.Handler],
    ):
        self._writer = writer
        self._records = records
        self._handlers = handlers

    @property
    def backlog(self) -> int:
        """Event records waiting for their writer."""
        return self._records.qsize()

    def stop(self) -> None:
        self._writer.stop()  # drains the queue before the thread ends
        for handler in self._handlers:
            handler.close()


def configure_logging(
    access_log: str | None = None,
    level: int = logging.INFO,
    *,
    event_backlog: int = EVENT_BACKLOG,
    report_interval: float = DROP_REPORT_INTERVAL,
) -> LogOutput:
    """JSON lines on standard output; access lines to `access_log` instead when it is set."""
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord | object] = queue.SimpleQueue()
    writer = _EventWriter(records, out, report_interval)
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records, event_backlog)]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True  # our own access line replaces it
    server_log = logging.getLogger("aiohttp.server")
    if _quiet_bad_requests not in server_log.filters:
        server_log.addFilter(_quiet_bad_requests)
    handlers: list[logging.Handler] = [out]
    # The access-log thread writes its lines itself: straight to the file, or through the
    # same stdout handler as the event logs (one handler, one lock, whole lines).
    access: logging.Handler = out
    if access_log:
        access = logging.FileHandler(access_log, encoding="utf-8")
        access.setFormatter(JsonFormatter())
        handlers.append(access)
    access_logger.handlers[:] = [access]
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO)
    writer.start()
    return LogOutput(writer, records, handlers)


_NO_CALL: Final = UpstreamCall("")  # what the line says of a request no upstream call served
FLUSH_INTERVAL: Final = 0.05  # seconds between hand-offs of queued lines to the writer


class AccessLog:
    """One JSON line per request, formatted on the event loop, written by a thread.

    `record()` formats the line (one f-string, a few µs) and appends it to a list; every
    FLUSH_INTERVAL the loop hands the whole list to the writer thread (one queue put), which
    joins it and logs it as one record: one write per batch, and the thread holds the GIL for
    a join, not for formatting, so a busy gateway wakes it twenty times a second and barely
    contends with the loop. At most `backlog` lines wait for the writer; a flush that would
    pass it drops its newest lines and counts them (`drops`), so a stuck file never blocks the
    loop or grows memory."""

    def __init__(self, backlog: int = ACCESS_BACKLOG) -> None:
        self._pending: list[str] = []
        self._queue: queue.SimpleQueue[list[str] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._limit = backlog
        self._queued = 0  # lines handed to the writer (only the loop adds)
        self._written = 0  # lines the writer is done with (only the writer adds)
        self._reopen_asked = False
        self.enabled = True

    @property
    def backlog(self) -> int:
        """Lines handed to the writer that it has not written yet."""
        return self._queued - self._written

    def start(self) -> None:
        if self._thread is None:
            self.enabled = access_logger.isEnabledFor(logging.INFO)
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    async def flush_forever(self) -> None:
        """Run on the event loop while serving: hand queued lines over at a steady pace."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            room = self._limit - self.backlog
            if len(batch) > room:  # the writer is behind: keep the oldest, drop the rest
                drops.add("access", len(batch) - max(room, 0))
                del batch[max(room, 0) :]
                if not batch:
                    return
            self._queued += len(batch)
            self._queue.put(batch)

    def reopen(self) -> None:
        """SIGUSR1, on the loop: ask the writer thread to reopen the access-log file (after a
        rename by logrotate); it does so between two batches. Standard output stays as it is."""
        if self._thread is not None and not self._reopen_asked:
            self._reopen_asked = True
            self._queue.put(_REOPEN)

    def stop(self) -> None:
        """Write every line queued so far, then end the thread."""
        self.flush()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=JOIN_TIMEOUT)
            if thread.is_alive():
                logger.warning(
                    "access log still writing after %ss; lines may be lost", JOIN_TIMEOUT
                )

    def record(
        self,
        request: Requested,
        exchange: Exchange,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        """Called on the event loop: the line is made here, from plain values (nothing of the
        request is kept until the batch is written), and queued."""
        if self.enabled:
            ex = exchange
            calls = ex.calls
            main = calls[0] if calls else _NO_CALL
            try:
                line = access_line(
                    time.time(), ex.request_id, ex.traceparent[3:35],
                    ex.client or request.remote or "", request.method, ex.path, ex.route,
                    ex.service, main.target, status, bytes_in, bytes_out, seconds * 1000,
                    main.ms, ex.consumer, ex.cache, max(main.attempts - 1, 0), calls,
                )  # fmt: skip
            except Exception:  # a bug must not cost the request its answer
                logger.exception("could not format an access line")
                return
            self._pending.append(line)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not _STOP:
            if batch is _REOPEN:
                self._reopen_asked = False
                for handler in access_logger.handlers:
                    if isinstance(handler, logging.FileHandler):
                        _reopen(handler)
                continue
            assert isinstance(batch, list)
            if batch:
                access_logger.info("\n".join(batch))
            self._written += len(batch)


def _reopen(handler: logging.FileHandler) -> None:
    """Open the handler's path again (appending: a reopen never truncates) and swap the new
    file in; if it cannot be opened, keep writing to the old one and say so."""
    path, encoding, errors = handler.baseFilename, handler.encoding, handler.errors
    try:
        stream = open(path, "a", encoding=encoding, errors=errors)  # noqa: SIM115  # handler's now
    except OSError as exc:
        logger.error("cannot reopen the access log %s: %s; still writing to the old file",
                     path, exc.strerror or exc)  # fmt: skip
        return
    old = handler.setStream(stream)  # under the handler's lock: no line is split
    if old is not None:
        old.close()
    logger.info("access log reopened: %s", path)


# RFC 3339 UTC times with milliseconds: the text of the last millisecond is kept (requests
# come many a millisecond under load), the seconds part is formatted once a second. Each cache
# is one tuple swapped in whole, so any thread may read it.
_stamp: list[tuple[int, str]] = [(-1, "")]  # (milliseconds since the epoch, its text)
_second: list[tuple[int, str]] = [(-1, "")]  # (seconds since the epoch, "YYYY-MM-DDTHH:MM:SS")
_MILLIS: Final = tuple(f".{ms:03d}+00:00" for ms in range(1000))
# JSON string, escaped to ASCII (C-accelerated): bytes that were not UTF-8 arrive as lone
# surrogates, which only an ASCII escape can write.
_q: Final = json.encoder.encode_basestring_ascii
# The parts of a line that repeat from request to request, made once: the route, service,
# target and status of a line; an upstream call but its time. Keyed by names the config
# validated and small numbers, so they stay small; cleared if they ever grow past this.
_FRAGMENTS_MAX: Final = 4096
_routing: dict[tuple[str, str, str, int], str] = {}
_call_parts: dict[tuple[str, str, str, int, int, str], tuple[str, str]] = {}


def _time_text(at: float) -> str:
    milliseconds = int(at * 1000)
    second = milliseconds // 1000
    cached = _second[0]
    if cached[0] != second:
        cached = _second[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = cached[1] + _MILLIS[milliseconds - second * 1000]
    _stamp[0] = (milliseconds, text)
    return text


def _routing_text(route: str, service: str, target: str, status: int) -> str:
    if len(_routing) >= _FRAGMENTS_MAX:
        _routing.clear()
    text = _routing[(route, service, target, status)] = (
        f'"route":{_name(route)},"service":{_name(service)},"target":{_name(target)},'
        f'"status":{status:d},'
    )
    return text


def _call_text(call: UpstreamCall, key: tuple[str, str, str, int, int, str]) -> tuple[str, str]:
    if len(_call_parts) >= _FRAGMENTS_MAX:
        _call_parts.clear()
    parts = _call_parts[key] = (
        f'{{"service":"{call.service}","kind":"{call.kind}","target":{_name(call.target)},'
        f'"attempts":{call.attempts:d},"ms":',
        f',"status":{call.status:d},"outcome":"{call.outcome}"}}',
    )
    return parts


def _name(name: str) -> str:
    return f'"{name}"' if name else "null"


def access_line(
    at: float,
    request_id: str,
    trace_id: str,
    client: str,
    method: str,
    path: str,
    route: str,
    service: str,
    target: str,
    status: int,
    bytes_in: int,
    bytes_out: int,
    total_ms: float,
    upstream_ms: float | None,
    consumer: str,
    cache: str,
    retries: int,
    calls: tuple[UpstreamCall, ...] = (),
) -> str:
    """The JSON access line: every field of CONTRACT §5, then `calls`, one object per upstream
    call (the forward, auth sub-requests, aggregate parts). `service`, `target`, `retries` and
    `upstream_ms` describe the first call. The query string is not logged (it may carry
    tokens); a target is shown by its label ("inventory#0"), never its address.

    Written for speed (it runs once a request, on the event loop): one f-string, the parts
    that repeat from request to request looked up, no helper call in the common case.
    request_id (validated by start_exchange), trace_id (hex), method (an HTTP token), route,
    service and target (names the config validated) never need escaping; the rest may."""
    stamp = _stamp[0]
    time_text = stamp[1] if stamp[0] == int(at * 1000) else _time_text(at)
    routing = _routing.get((route, service, target, status)) or _routing_text(
        route, service, target, status
    )
    upstream = "null" if upstream_ms is None else f"{upstream_ms:.3f}"
    listed = ""
    for call in calls:
        key = (call.service, call.kind, call.target, call.attempts, call.status, call.outcome)
        before, after = _call_parts.get(key) or _call_text(call, key)
        ms = call.ms  # the first call's is the line's upstream_ms, formatted once
        ms_text = upstream if ms == upstream_ms else "null" if ms is None else f"{ms:.3f}"
        listed = f"{listed},{before}{ms_text}{after}" if listed else f"{before}{ms_text}{after}"
    return (
        f'{{"time":"{time_text}","request_id":"{request_id}","trace_id":"{trace_id}",'
        f'"client":{_q(client)},"method":"{method}","path":{_q(path)},{routing}'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"total_ms":{total_ms:.3f},'
        f'"upstream_ms":{upstream},"consumer":{_q(consumer) if consumer else "null"},'
        f'"cache":{_q(cache) if cache else "null"},"retries":{retries},"calls":[{listed}]}}'
    )
