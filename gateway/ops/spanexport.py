"""The OTLP export of the gateway's spans, from a child process: there the SDK's ReadableSpans
are made and its OTLPSpanExporter encodes them (protobuf, ~7 µs a span, with the encoder of
gateway/ops/otlpencode.py, which builds the SDK's request without its copies) and POSTs them,
instead of in the process that serves requests, where that work held the GIL against the
event loop and doubled what a traced request cost.

The gateway records each sampled request as a `RequestRecord`, a tuple of the values its
spans are made of (gateway/ops/spanrecord.py, which makes them here), and the SDK's
BatchSpanProcessor queues and batches them as it would spans.
`ExportProcess` is what that processor exports to, from its own thread: it sends the records,
`marshal`led, CHUNK to a message, over a Unix SOCK_SEQPACKET socket pair (a message arrives
whole or not at all) to `python -m gateway.ops.spanexport`, which makes them ReadableSpans
and calls the real OTLPSpanExporter with up to BATCH requests' at a time. Nothing of OTLP is
written here: the child's request is the SDK's, byte for byte.

Bounded, and never on the loop: the child holds at most WINDOW messages (it answers each
batch it has exported); past that the processor's thread waits, so its bounded queue fills
and `CountingProcessor` drops and counts what comes next, as with no child at all.

Supervised from that thread. Started at once, from a thread (fork and exec never run on the
loop). Restarted when it dies (at once, then after a growing pause while it keeps dying
young) or hangs (no answer for two export timeouts and a second while it holds messages):
the spans it held are counted as dropped (`lost`), and the next child gets a new socket
pair. On shutdown the gateway closes its end: the child exports what it holds and exits, and
is killed at the flush deadline. It ignores SIGINT, SIGHUP and SIGUSR1 and has a process
group of its own (a Ctrl-C, a reload, a log reopen are the gateway's); a gateway that dies
closes its end too, and the child, its parent gone, exits without exporting more.

One child per gateway process: with --workers N, each worker has its own. The child inherits
the gateway's CPU affinity; nothing here changes it.

Background work. The child lowers its own priority by NICENESS (nice +10 over the gateway's):
on a CPU both need, the scheduler gives the gateway's requests about nine tenths of it, and
spans the child can't keep up with wait in the bounded queue and are then dropped and counted
(gateway_trace_spans_dropped_total), as the SDK's processor does when its exporter is slow. On
a host with CPU to spare it changes nothing. A collector agent, its CPU and its priority are
the operator's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.ops.spanrecord import RequestRecord, SharedResource, plain, spans_in, spans_of

if TYPE_CHECKING:  # the child imports it (otlp_exporter), never the gateway
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

CHUNK: Final = 128  # requests' records per message (~35 KiB for a proxied GET's)
WINDOW: Final = 8  # messages the child may hold (sent, not yet exported): 1,024 requests
MAX_MESSAGE: Final = 64 * 1024  # bytes; a bigger chunk is split (a record is at most a few KiB)
SEND_BUFFER: Final = 2 * WINDOW * MAX_MESSAGE  # the socket's, asked for
BATCH: Final = 512  # requests the child puts in one OTLP request (~1,000 spans), from the
# messages waiting: the POST's own cost is then about 2 µs a span
POLL: Final = 0.25  # seconds between looks at the child while a send waits
STUCK_MARGIN: Final = 1.0  # seconds past two export timeouts with no answer: it hangs
YOUNG: Final = 10.0  # a child that dies sooner than this after its start is restarted later
MAX_PAUSE: Final = 30.0  # seconds, the longest pause before a restart
NICENESS: Final = 10  # the child's, above the gateway's: where they share a CPU, requests win
_FLUSH, _DONE, _FLUSHED = "f", "d", "F"  # control messages: (kind, number)
_IGNORED: Final = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)  # meant for the gateway
logger = logging.getLogger("gateway.tracing")
# A message is a list of RequestRecords (gateway/ops/spanrecord.py), or a control tuple.


class ExportProcess(SpanExporter):
    """Where the BatchSpanProcessor sends its batches of RequestRecords (not ReadableSpans):
    the export child (see the module's text). Its methods block: the processor's thread calls
    them, and `start` and `shutdown` run on threads of their own."""

    def __init__(
        self,
        endpoint: str,
        timeout: float,
        resource: Mapping[str, str],
        scope: str,
    ) -> None:
        self._command = [
            sys.executable, "-m", __name__, endpoint, repr(timeout), json.dumps(dict(resource)),
            scope,
        ]  # fmt: skip
        self._stuck = 2 * timeout + STUCK_MARGIN
        self._socket, self._child_end = _pair()
        self._child: subprocess.Popen[bytes] | None = None
        self._started = 0.0  # monotonic time of the child's start
        self._pause = 0.0  # before the next restart, while children die young
        self._in_flight: deque[int] = deque()  # spans of each message the child holds
        self._flushes = 0  # flush tokens sent
        self._flushed = 0  # the last token answered
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the child, the socket and the window
        self.starts = 0  # children started (the first included)
        self.lost = 0  # spans a child held when it died or was killed (only this adds)

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before it starts, or once it has died)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def start(self) -> None:
        """Start the child now rather than at the first export (its imports take a while)."""
        with self._lock:
            if not self._stopping.is_set():
                self._running()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        """Send a batch of the processor's items, each a request's RequestRecord; wait while
        the child holds WINDOW messages. All are marshalled first, then sent back to back:
        the child finds them waiting and puts them in one OTLP request."""
        messages = list(_messages(spans))
        with self._lock:
            for count, message in messages:
                if not self._send(message, count):
                    return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until every span sent before is exported, or counted lost with a child that
        died meanwhile."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            while not self._stopping.is_set():
                self._flushes += 1
                token = self._flushes
                if not self._send(marshal.dumps((_FLUSH, token)), 0, deadline):
                    return False
                child = self._child
                assert child is not None  # `_send` has just sent to it
                while self._flushed < token and child.poll() is None:
                    if (left := deadline - time.monotonic()) <= 0 or self._stopping.is_set():
                        return False
                    self._answers(min(left, POLL))
                if self._flushed >= token:
                    return True
                # It died first: the next `_send` counts what it held and starts another.
        return False

    def shutdown(self, timeout_millis: float = 30000) -> None:
        """Close the gateway's end: the child exports what it holds and exits; it is killed
        when `timeout_millis` pass first. A send waiting for the child gives up at once."""
        deadline = time.monotonic() + timeout_millis / 1000
        self._stopping.set()
        with self._lock:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_WR)
            child = self._child
            if child is not None:
                try:
                    child.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                with contextlib.suppress(OSError):
                    self._answers(0.0)
                self._lose("stopped")
            self._socket.close()
            self._child_end.close()

    def _send(self, message: bytes, spans: int, deadline: float | None = None) -> bool:
        """Hand one message to the child, starting or restarting it as needed; wait while it
        holds WINDOW messages. False when stopping, or past `deadline`."""
        progress = time.monotonic()
        while not self._stopping.is_set():
            if not self._running():
                progress = time.monotonic()
                continue
            if len(self._in_flight) < WINDOW:
                try:
                    self._socket.send(message)
                except TimeoutError:  # the socket's own limits, smaller than the window
                    pass
                except OSError:
                    logger.exception("trace export: a message cannot be sent: dropped")
                    return False
                else:
                    if spans:
                        self._in_flight.append(spans)
                    return True
            if self._answers(POLL):
                progress = time.monotonic()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now - progress > self._stuck:
                logger.warning("trace export process hung: killing it")
                self._kill()
        return False

    def _answers(self, wait: float) -> bool:
        """Read the child's answers, waiting up to `wait` seconds for the first. True when
        any came."""
        came = False
        self._socket.settimeout(wait)
        try:
            while data := self._socket.recv(64):
                kind, number = marshal.loads(data)
                if kind == _DONE:
                    for _ in range(min(number, len(self._in_flight))):
                        self._in_flight.popleft()
                elif kind == _FLUSHED:
                    self._flushed = max(self._flushed, number)
                came = True
                self._socket.setblocking(False)
        except (TimeoutError, BlockingIOError):
            pass
        finally:
            self._socket.settimeout(POLL)
        return came

    def _running(self) -> bool:
        """True when a child runs; else start one (after the pause, while children die
        young) and say whether it did."""
        child = self._child
        if child is not None and child.poll() is None:
            return True
        if child is not None:
            lived = time.monotonic() - self._started
            self._pause = 0.0 if lived >= YOUNG else min(MAX_PAUSE, max(1.0, self._pause * 2))
            logger.warning(
                "trace export process exited (status %s) after %.1f s; restarting it%s",
                child.returncode,
                lived,
                f" in {self._pause:.0f} s" if self._pause else "",
            )
            self._lose("exited")
            if self._stopping.wait(self._pause):
                return False
        try:
            self._child = subprocess.Popen(
                self._command,
                stdin=self._child_end.fileno(),
                process_group=0,  # a Ctrl-C or a signal to the gateway's group is not for it
            )
        except OSError:
            logger.exception("trace export process cannot start")
            self._pause = min(MAX_PAUSE, max(1.0, self._pause * 2))
            self._stopping.wait(self._pause)
            return False
        self._started = time.monotonic()
        self.starts += 1
        return True

    def _kill(self) -> None:
        """End a child that hangs; `_running` then restarts it."""
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()

    def _lose(self, why: str) -> None:
        """The child is gone: count the spans it held, and give the next one a new socket
        pair (the old one may hold messages of spans already counted)."""
        self._child = None
        lost = sum(self._in_flight)
        if lost:
            self.lost += lost
            logger.warning("trace export process %s holding %d spans: dropped", why, lost)
        self._in_flight.clear()
        if not self._stopping.is_set():
            self._socket.close()
            self._child_end.close()
            self._socket, self._child_end = _pair()


def _pair() -> tuple[socket.socket, socket.socket]:
    """The gateway's end (a send waits POLL seconds at most) and the child's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(OSError):  # room for the window (the kernel may cap it)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    ours.settimeout(POLL)
    return ours, theirs


def _messages(records: Sequence[RequestRecord]) -> Iterator[tuple[int, bytes]]:
    """The records as messages of at most CHUNK (and MAX_MESSAGE bytes), each with its
    number of spans."""
    for at in range(0, len(records), CHUNK):
        yield from _sized(list(records[at : at + CHUNK]))


def _sized(records: list[RequestRecord]) -> Iterator[tuple[int, bytes]]:
    try:
        message = marshal.dumps(records)
    except ValueError:  # a value of a str or int subclass (marshal takes exact types)
        message = marshal.dumps([plain(record) for record in records])
    if len(message) <= MAX_MESSAGE:
        yield sum(map(spans_in, records)), message
    elif len(records) > 1:
        half = len(records) // 2
        yield from _sized(records[:half])
        yield from _sized(records[half:])
    else:
        logger.warning(
            "trace export: a request's spans of %d bytes are too big to send: dropped",
            len(message),
        )


def otlp_exporter(endpoint: str, timeout: float) -> OTLPSpanExporter:
    """The child's exporter: the SDK's OTLPSpanExporter (its HTTP, retries, compression,
    headers, timeouts), which encodes with gateway/ops/otlpencode.py's `encode_spans`, the
    SDK's request without the SDK encoder's copies. Imported here, in the child only."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from gateway.ops import otlpencode

    otlpencode.install()  # warns, and the SDK's encoder serves, if it cannot
    return OTLPSpanExporter(endpoint, timeout=timeout)


def main(argv: Sequence[str]) -> int:
    """The child: records from standard input (the socket) to the OTLP endpoint in argv."""
    from gateway.ops.accesslog import JsonFormatter

    for sig in _IGNORED:  # the gateway stops this process by closing the socket
        signal.signal(sig, signal.SIG_IGN)
    os.nice(NICENESS)  # see the module's text ("Background work")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    parent = os.getppid()
    endpoint, timeout, resource_json, scope_name = argv
    exporter = otlp_exporter(endpoint, float(timeout))
    resource = SharedResource(json.loads(resource_json))
    scope = InstrumentationScope(scope_name)
    source = socket.socket(fileno=sys.stdin.fileno())
    while data := source.recv(MAX_MESSAGE):  # b"": the gateway closed its end
        records: list[RequestRecord] = []
        messages, flushes = 0, []
        source.setblocking(False)
        while data:  # with what else waits, up to BATCH requests: one OTLP request
            message = marshal.loads(data)
            if isinstance(message, tuple):
                flushes.append(message[1])
            else:
                records += message
                messages += 1
            data = b""
            if len(records) < BATCH:
                with contextlib.suppress(BlockingIOError):
                    data = source.recv(MAX_MESSAGE)
        source.setblocking(True)
        if os.getppid() != parent:  # the gateway died: nobody waits for these
            return 0
        if records:
            exporter.export(spans_of(records, resource, scope))  # failures: the SDK logs
        with contextlib.suppress(OSError):  # the gateway went away meanwhile
            if messages:
                source.send(marshal.dumps((_DONE, messages)))
            for token in flushes:
                source.send(marshal.dumps((_FLUSHED, token)))
    exporter.shutdown()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
