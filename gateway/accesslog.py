"""Log output: one JSON object a line, for access lines and for the gateway's own events.

Access lines are built from the Exchange on the event loop (a tuple put on a queue) and
formatted and written by one background thread, so a slow stdout or disk never stalls a
request. Event logs (gateway.config, gateway.upstream, ...) use the same JSON form.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from gateway.exchange import Exchange

access_logger = logging.getLogger("gateway.access")
_STOP: Final = object()


class JsonFormatter(logging.Formatter):
    """A dict message is the line itself (access lines); anything else is wrapped."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            return json.dumps(record.msg, separators=(",", ":"))
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def configure_logging(access_log: str | None = None, level: int = logging.INFO) -> None:
    """JSON lines on standard output; access lines to `access_log` instead when it is set."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True
    if access_log:
        file_handler = logging.FileHandler(access_log, encoding="utf-8")
        file_handler.setFormatter(JsonFormatter())
        access_logger.handlers[:] = [file_handler]
        access_logger.propagate = False


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
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def record(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        if access_logger.isEnabledFor(logging.INFO):
            entry = (time.time(), exchange, request.method, request.remote or "", status)
            self._queue.put((*entry, bytes_in, bytes_out, seconds * 1000))

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, tuple)
            access_logger.info(access_fields(*item))


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
    """The JSON access line: every field of CONTRACT §5. The query string is not logged."""
    return {
        "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"),
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
