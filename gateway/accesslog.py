"""Log output: one JSON object a line, for access lines and for the gateway's own events.

Nothing here writes on the event loop. Access lines are queued as a small tuple per request
and built, formatted and written by one background thread; event logs (gateway.config,
gateway.upstream, ...) go through a `QueueHandler` to a second thread. Both threads write
through the same handler, so lines never interleave, and both drain their queues on stop,
so no line is lost at shutdown.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from gateway.exchange import Exchange

access_logger = logging.getLogger("gateway.access")
logger = logging.getLogger(__name__)
_STOP: Final = object()
JOIN_TIMEOUT: Final = 5.0  # seconds stop() waits for a writer thread to drain its queue


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """A dict message is the line itself (access lines); anything else is wrapped."""

    def format(self, record: logging.LogRecord) -> str:
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


Entry = tuple[float, Exchange, str, str, int, int, int, float]


class AccessLog:
    """Queues one entry per request; a daemon thread turns them into JSON lines."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Entry | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Write every line queued so far, then end the thread."""
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
        """Called on the event loop: only a tuple is built here; the thread does the rest."""
        if access_logger.isEnabledFor(logging.INFO):
            entry = (time.time(), exchange, request.method, request.remote or "", status)
            self._queue.put((*entry, bytes_in, bytes_out, seconds * 1000))

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, tuple)
            try:
                access_logger.info(access_fields(*item))
            except Exception:  # a bad entry must not end the thread and lose every later line
                logger.exception("could not write an access line")


def access_fields(
    at: float,
    ex: Exchange,
    method: str,
    peer: str,
    status: int,
    bytes_in: int,
    bytes_out: int,
    total_ms: float,
) -> dict[str, object]:
    """The JSON access line: every field of CONTRACT §5. The query string is not logged (it
    may carry tokens); `target` is the target's label ("inventory#0"), not its address."""
    return {
        "time": _iso(at),
        "request_id": ex.request_id,
        "trace_id": ex.trace_id,
        "client": ex.client or peer,
        "method": method,
        "path": ex.path,
        "route": ex.route or None,
        "service": ex.service or None,
        "target": ex.target or None,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "total_ms": round(total_ms, 3),
        "upstream_ms": None if ex.upstream_ms is None else round(ex.upstream_ms, 3),
        "consumer": ex.consumer or None,
        "cache": ex.cache or None,
        "retries": ex.retries,
    }
