"""Log output: one JSON object a line, for access lines and for the gateway's own events.

Nothing here writes on the event loop. Access lines are queued as a small tuple per request
and handed over in batches to one background thread that formats and writes them; event logs
(gateway.config, gateway.upstream, ...) go through a `QueueHandler` to a second thread. Both
threads write through the same handler, so lines never interleave, and both drain their queues
on stop, so no line is lost at shutdown.
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
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import starmap
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.exchange import Exchange

access_logger = logging.getLogger("gateway.access")
logger = logging.getLogger(__name__)
_STOP: Final = object()
JOIN_TIMEOUT: Final = 5.0  # seconds stop() waits for a writer thread to drain its queue


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
    needs pickling, and the exception is formatted on the writer thread, not the loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        if not isinstance(record.msg, dict):
            record.msg, record.args = record.getMessage(), None  # freeze the arguments now
        return record


class LogOutput:
    """The installed JSON output; `stop()` writes what is still queued and restores logging."""

    def __init__(self, listener: logging.handlers.QueueListener, handlers: list[logging.Handler]):
        self._listener = listener
        self._handlers = handlers

    def stop(self) -> None:
        self._listener.stop()  # drains the queue before the thread ends
        for handler in self._handlers:
            handler.close()


def configure_logging(access_log: str | None = None, level: int = logging.INFO) -> LogOutput:
    """JSON lines on standard output; access lines to `access_log` instead when it is set."""
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, out)
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
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
    listener.start()
    return LogOutput(listener, handlers)


Entry = tuple[
    float, str, str, str, str, str, str, str, str, int, int, int, float, float | None, str, str, int
]
FLUSH_INTERVAL: Final = 0.05  # seconds between hand-offs of queued lines to the writer


class AccessLog:
    """One JSON line per request, at the cost of a tuple on the event loop.

    `record()` appends a tuple to a list; every FLUSH_INTERVAL the loop hands the whole list to
    a writer thread (one queue put), which formats the lines and logs them as one record, so a
    busy gateway wakes the thread twenty times a second, not once a request."""

    def __init__(self) -> None:
        self._pending: list[Entry] = []
        self._queue: queue.SimpleQueue[list[Entry] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.enabled = True

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
            self._queue.put(batch)

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
        request: web.BaseRequest,
        exchange: Exchange,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        """Called on the event loop: only a tuple of plain values is built here (holding the
        Exchange until the batch is written would keep it, and what it refers to, in the
        garbage collector's young generation); the thread does the rest."""
        if self.enabled:
            ex = exchange
            self._pending.append(
                (time.time(), ex.request_id, ex.trace_id, ex.client or request.remote or "",
                 request.method, ex.path, ex.route, ex.service, ex.target, status, bytes_in,
                 bytes_out, seconds * 1000, ex.upstream_ms, ex.consumer, ex.cache, ex.retries)
            )  # fmt: skip

    def _run(self) -> None:
        while (batch := self._queue.get()) is not _STOP:
            assert isinstance(batch, list)
            try:
                text = "\n".join(starmap(access_line, batch))
            except Exception:  # one bad entry: keep every other line of the batch
                text = "\n".join(_each_line(batch))
            if text:
                access_logger.info(text)


def _each_line(batch: list[Entry]) -> Iterator[str]:
    for entry in batch:
        try:
            yield access_line(*entry)
        except Exception:
            logger.exception("could not format an access line")


class _Clock:
    """RFC 3339 UTC times with milliseconds; the seconds part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, at: float) -> str:
        second = int(at)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((at - second) * 1000):03d}+00:00"


_iso_line_time = _Clock()  # used by the writer thread only
# JSON string, escaped to ASCII (C-accelerated): bytes that were not UTF-8 arrive as lone
# surrogates, which only an ASCII escape can write.
_q: Final = json.encoder.encode_basestring_ascii
# request_id (validated by start_exchange), trace_id (hex), method (an HTTP token), route,
# service and target (names the config validated) never need escaping; the rest may.
_LINE: Final = (
    '{"time":"%s","request_id":"%s","trace_id":"%s","client":%s,"method":"%s","path":%s,'
    '"route":%s,"service":%s,"target":%s,"status":%d,"bytes_in":%d,"bytes_out":%d,'
    '"total_ms":%.3f,"upstream_ms":%s,"consumer":%s,"cache":%s,"retries":%d}'
)


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
) -> str:
    """The JSON access line: every field of CONTRACT §5. The query string is not logged (it
    may carry tokens); `target` is the target's label ("inventory#0"), not its address.
    Written for speed (it runs once a request): no helper calls for the optional fields."""
    return _LINE % (
        _iso_line_time(at), request_id, trace_id, _q(client), method, _q(path),
        f'"{route}"' if route else "null",
        f'"{service}"' if service else "null",
        f'"{target}"' if target else "null",
        status, bytes_in, bytes_out, total_ms,
        "null" if upstream_ms is None else f"{upstream_ms:.3f}",
        _q(consumer) if consumer else "null",
        _q(cache) if cache else "null",
        retries,
    )  # fmt: skip
