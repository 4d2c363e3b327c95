"""A lean HTTP/1.1 client for upstream requests: keep-alive connections pooled per target.

aiohttp's ClientSession builds request and response object graphs, timer handles and
connector bookkeeping for every request; on a small proxied GET that is most of the gateway's
upstream cost (issue 17). This client does only what an HTTP/1.1 proxy client must:

- `Pool.request` writes one pre-encoded head (one join, one encode) and the body: bytes in
  the same write, a stream with its Content-Length when the headers give one, or chunked;
  while the transport's buffer is full (pause_writing) the body waits for it to drain.
- Responses are parsed by `httptools` (llhttp, the parser uvicorn uses) out of one receive
  buffer per pool, reused for every read of its connections (a new bytes object per read
  made glibc trim its heap over and over: three times the CPU per GiB). A read fills it
  (256 KiB) while the consumer waits for bytes, and takes 64 KiB while it does not.
- The body is handed over chunk by chunk (`Response.read_chunk`). Past PAUSE_AT bytes that
  the consumer has not taken, the upstream socket is no longer read until the buffer falls
  below RESUME_BELOW: a slow client costs a fixed amount of memory, never the whole body.
- A connection goes back to its pool only after a complete response that allows keep-alive,
  with the request body fully sent and no byte beyond the response received. Anything else
  (an error, a timeout, a cancellation, a body left unread, bytes out of turn) closes it:
  a broken upstream never poisons the pool.
- An idle connection that the upstream closes is dropped from the pool the moment the loop
  sees its EOF. For the race where the close crosses a new request, `retry_stale` lets the
  caller have an idempotent request with a replayable body sent once more, on a new
  connection, when nothing of a response had arrived; every error says whether request
  bytes were written (`sent`) and whether the connection was a pooled one (`reused`).

Timeouts (gateway.config.model.Timeouts): `connect` covers the TCP and TLS handshakes; `read`
is the silence allowed while someone waits for response bytes once the request body is sent
(as aiohttp's sock_read; a consumer that stops reading stops that clock); `total` bounds the
whole exchange, connect and body included. One timer per connection serves both, re-armed
only when it fires, never per read or per request.

H1Error                        every failure; .sent: request bytes were written,
  │                            .reused: on a pooled keep-alive connection
  ├─ ConnectError              no connection: refused, unreachable, name, TLS handshake or
  │    └─ ConnectTimeout       certificate; nothing was sent
  ├─ PoolFull                  max_connections are in use: raised at once, nothing was sent
  ├─ UpstreamClosed            the connection ended before the response head
  ├─ ProtocolError             the upstream broke HTTP/1.1: status line, header, chunk size,
  │    └─ IncompleteBody       framing, size; or the connection ended mid-body
  ├─ RequestBodyError          the request body's source failed, or disagreed with its
  │                            Content-Length (the client's fault, not the upstream's)
  └─ H1Timeout                 also a TimeoutError
       ├─ ConnectTimeout · ReadTimeout · TotalTimeout

How a relay uses it: `response = await pool.request(...)`; the head is `response.status`,
`.reason` and `.headers`; then `chunk = await response.read_chunk()` until it returns b""
(which also hands the connection back), and `response.close()` in a `finally` (a no-op after
the end). The first chunk is usually there already (`response.buffered()`), so the relay can
send its head and the first body bytes in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Final, cast

import httptools
from aiohttp import StreamReader
from yarl import URL

from gateway.config.model import Timeouts
from gateway.http.errors import ClientFailure

# Bytes read from an upstream socket at a time, into one buffer per pool that every read of
# its connections reuses (httptools copies the body out of it before the read returns). A read
# takes the whole buffer while the consumer waits for bytes (a fast client: 256 KiB reads cost
# 0.6 CPU s/GiB where 64 KiB ones cost 1.0), and RECV_SMALL while it has not taken the last
# ones (a slow client: what a response holds stays near PAUSE_AT).
RECV_BUFFER: Final = 262144
RECV_SMALL: Final = 65536
# Bytes of body the consumer has not taken: stop reading the socket. 64 KiB (one read) rather
# than 128: 200 non-reading clients cost 132 MiB RSS instead of 150 (bench hostile phase), and
# 1 GiB downloads took no more CPU per byte (bench/PROFILE.md).
PAUSE_AT: Final = 65536
RESUME_BELOW: Final = 32768  # ...and read again once it has taken the rest down below this
MAX_HEAD: Final = 65536  # bytes of response head (1xx heads included) before it is refused
MAX_INFORMATIONAL: Final = 16  # 1xx responses ahead of the final one before it is refused
IDLE_TIMEOUT: Final = 15.0  # seconds an unused keep-alive connection is kept; aiohttp's too
# SO_RCVBUF of upstream sockets, set before connecting; None leaves the kernel's autotuning.
# A fixed 64 KiB cut 256 MiB download throughput by ~40% and cost ~45% more CPU per byte (bench:
# h1client_bench --path '/stream?bytes=268435456' --concurrency 1), and what this process holds
# per response is bounded by RECV_BUFFER and PAUSE_AT whatever the kernel buffers: a cap only
# bounds the kernel's memory for upstreams whose clients stopped reading.
RCVBUF: Final[int | None] = None
SMALL_BODY: Final = 16384  # bytes: a body this small is copied into the head's write
# Methods for which no body means no Content-Length either; others get "Content-Length: 0"
# (as aiohttp sends: some servers answer 411 to a POST without one).
NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})
DEFAULT_TIMEOUTS: Final = Timeouts()  # connect 5 s, read 60 s, no total
Headers = Sequence[tuple[str, str]]
Body = bytes | StreamReader | AsyncIterable[bytes] | None


class H1Error(ClientFailure):
    """Any failure of an upstream exchange; the message never names the address (nor does
    `summary`, what the gateway's problem detail says: gateway/http/errors.py)."""

    sent: bool = False  # request bytes were handed to the transport
    reused: bool = False  # the connection had served a request before (from the pool)


class ConnectError(H1Error):
    """No connection: refused, unreachable, unknown name, TLS handshake or certificate."""

    summary = "connection refused or unreachable"


class PoolFull(H1Error):
    """Every connection the service allows (max_connections) is in use."""

    pool_full = True


class UpstreamClosed(H1Error):
    """The connection ended (closed or reset) before a response head arrived."""

    summary = "connection closed before a response"


class ProtocolError(H1Error):
    """The upstream's bytes are not an HTTP/1.1 response (or not the end of one)."""

    summary = "malformed response"


class IncompleteBody(ProtocolError):
    """The connection ended before the body its framing announced."""


class RequestBodyError(H1Error):
    """The request body could not be sent as declared: its source raised (the error is the
    cause) or it gave more or fewer bytes than its Content-Length."""

    client_fault = True
    summary = "the request body could not be sent"


class H1Timeout(H1Error, TimeoutError):
    """A timeout; which one is the class."""


class ConnectTimeout(ConnectError, H1Timeout):
    """The TCP or TLS handshake took longer than the connect timeout."""


class ReadTimeout(H1Timeout):
    """No response byte arrived for `read` seconds while one was awaited."""


class TotalTimeout(H1Timeout):
    """The exchange, body included, took longer than `total` seconds."""


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing: the response has ended (HEAD) or
    bytes follow it. The parser is spent; the connection's state says what happened."""


class Limit:
    """A service's max_connections, shared by its targets' pools: connections in use."""

    __slots__ = ("busy", "max")

    def __init__(self, max_connections: int) -> None:
        self.max = max_connections
        self.busy = 0


@functools.cache
def default_ssl_context() -> ssl_module.SSLContext:
    """The system's trusted CAs, hostnames checked: made once (it reads files), so make it
    before the loop runs, or pass a context to `Pool`."""
    return ssl_module.create_default_context()


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            if not value.isdigit() or not value.isascii():
                raise RequestBodyError("the request's Content-Length is not a number")
            return int(value)
    return None


class Pool:
    """Keep-alive connections to one target (`http://host:port/base` or `https://...`).

    `request` takes an idle connection (the most recently used: its socket is warm) or opens
    one while the shared `Limit` allows, and raises PoolFull at once when it does not."""

    __slots__ = (
        "_after_target",
        "_base",
        "_busy",
        "_closed",
        "_host",
        "_idle",
        "_port",
        "_server_hostname",
        "_small_view",
        "_ssl",
        "_view",
        "idle_timeout",
        "limit",
        "rcvbuf",
        "timeouts",
    )

    def __init__(
        self,
        url: str,
        limit: Limit,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        *,
        ssl: ssl_module.SSLContext | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        rcvbuf: int | None = RCVBUF,
        host_header: str | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """`host_header` and `server_hostname` stand for the URL's host in the Host header and
        in TLS (a target found by DNS is reached at an address but named by its host)."""
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parsed.raw_host
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._base = parsed.raw_path.rstrip("/")  # a target's base path; "" for "/"
        host = host_header or parsed.host_port_subcomponent
        self._after_target = f" HTTP/1.1\r\nHost: {host}\r\n"
        if parsed.scheme == "https":
            self._ssl: ssl_module.SSLContext | None = ssl or default_ssl_context()
            self._server_hostname: str | None = server_hostname or parsed.raw_host
        else:
            self._ssl, self._server_hostname = None, None
        self.limit = limit
        self.timeouts = timeouts
        self.idle_timeout = idle_timeout
        self.rcvbuf = rcvbuf
        self._idle: list[_Connection] = []  # a stack: the last one in is the first one out
        self._busy: set[_Connection] = set()  # in an exchange: `abort` ends them
        self._closed = False
        self._view = memoryview(bytearray(RECV_BUFFER))  # see RECV_BUFFER
        self._small_view = self._view[:RECV_SMALL]

    @property
    def idle(self) -> int:
        """Connections kept open for the next requests."""
        return len(self._idle)

    def encode_head(self, method: str, path_qs: str, headers: Headers, framing: str) -> bytes:
        """The request head: request line, Host, `headers` as given (validated by the caller:
        no CR, LF or NUL; no Host, Connection or Transfer-Encoding), then `framing`. Encoded
        as aiohttp's server decoded them (UTF-8, surrogateescape): the bytes a client sent
        are the bytes the upstream gets."""
        lines = "\r\n".join(map(": ".join, headers))
        return "".join(
            (
                method,
                " ",
                self._base,
                path_qs,
                self._after_target,
                lines,
                "\r\n" if lines else "",
                framing,
                "\r\n",
            )
        ).encode("utf-8", "surrogateescape")

    async def request(
        self,
        method: str,
        path_qs: str,
        headers: Headers,
        body: Body = None,
        timeouts: Timeouts | None = None,
        *,
        retry_stale: bool = False,
    ) -> Response:
        """Send a request and return once its response head has arrived (1xx skipped, 101
        returned). `path_qs` is the encoded path and query after the target's base path.
        A Content-Length in `headers` frames a streamed body (it must match); without one,
        bytes get theirs and streams go chunked. `retry_stale`: the request may be sent again
        (idempotent, and `body` is bytes or None); see the module docstring."""
        if self._closed:
            raise ConnectError("the pool is closed")
        limit = self.limit
        if limit.busy >= limit.max:
            raise PoolFull("every allowed connection to the service is in use")
        timeouts = timeouts or self.timeouts
        length: int | None = None
        if body is None:
            framing = ""
            if method not in NO_BODY_METHODS and _content_length(headers) is None:
                framing = "Content-Length: 0\r\n"
        elif isinstance(body, bytes):
            declared = _content_length(headers)
            framing = "" if declared is not None else f"Content-Length: {len(body)}\r\n"
            if declared is not None and declared != len(body):
                raise RequestBodyError("the request body does not match its Content-Length")
        else:
            retry_stale = False  # a stream cannot be sent twice
            length = _content_length(headers)
            framing = "Transfer-Encoding: chunked\r\n" if length is None else ""
        head = self.encode_head(method, path_qs, headers, framing)
        limit.busy += 1
        conn: _Connection | None = None
        try:
            conn = self._take()
            # A pooled connection knows its loop (asyncio.get_running_loop() is a getpid
            # system call each time, on CPython).
            loop = conn._loop if conn is not None else asyncio.get_running_loop()
            deadline = None if timeouts.total is None else loop.time() + timeouts.total
            while True:
                if conn is None:
                    conn = await self._connect(loop, timeouts.connect, deadline)
                waiter = conn.start(head, body, length, method == "HEAD", timeouts.read, deadline)
                await waiter  # cancelled: the `except BaseException` below closes the connection
                error = conn._error
                if error is None:
                    return Response(conn)
                if (
                    retry_stale
                    and isinstance(error, UpstreamClosed)
                    and conn._reused
                    and not conn._got_bytes
                ):
                    retry_stale = False
                    conn._end(False)
                    limit.busy += 1  # _end gave the slot back; the retry takes it again
                    conn = None
                    continue
                error.sent, error.reused = conn._sent, conn._reused
                raise error
        except BaseException:
            if conn is None:
                limit.busy -= 1
            else:
                conn._end(False)
            raise

    def _take(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        stale = idle[-1]._loop.time() - self.idle_timeout
        while idle:
            conn = idle.pop()
            transport = conn._transport
            if (
                conn._closed
                or conn._idle_since < stale
                or transport is None
                or transport.is_closing()
            ):
                conn._close()
                continue
            conn._reused = True
            return conn
        return None

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, connect: float | None, deadline: float | None
    ) -> _Connection:
        until = None if connect is None else loop.time() + connect
        total_first = deadline is not None and (until is None or deadline < until)
        if total_first:
            until = deadline
        try:
            async with asyncio.timeout_at(until):
                sock = await self._open_socket(loop)
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, loop),
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname,
                    )
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            if total_first:
                raise TotalTimeout("the exchange took longer than its total timeout") from None
            raise ConnectTimeout("the connection was not established in time") from None
        except ssl_module.SSLError as exc:
            error = ConnectError(f"TLS handshake failed: {exc.reason or 'error'}")
            error.summary = (
                "its TLS certificate could not be verified"
                if isinstance(exc, ssl_module.SSLCertVerificationError)
                else "the TLS handshake failed"
            )
            raise error from exc
        except OSError as exc:
            raise ConnectError("connection refused or unreachable") from exc
        return conn

    async def _open_socket(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """A connected socket to the first of the target's addresses that answers, with
        `rcvbuf` set before the connect (the TCP window scale is agreed in the handshake)."""
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        error: OSError = OSError("the name has no address")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                if self.rcvbuf is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error

    def _ended(self, conn: _Connection, reusable: bool) -> None:
        """An exchange is over: keep the connection for the next request or close it."""
        self.limit.busy -= 1
        self._busy.discard(conn)
        if reusable and not self._closed and not conn._closed:
            now = conn._loop.time()
            conn._idle_since = now
            idle = self._idle
            idle.append(conn)
            if idle[0]._idle_since < now - self.idle_timeout:  # the oldest has sat too long
                idle.pop(0)._close()
        else:
            conn._close()

    def _forget(self, conn: _Connection) -> None:
        """An idle connection was closed (by the upstream, or out-of-turn bytes)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def close(self) -> None:
        """Close the idle connections now; connections in use close when released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn._close()

    def abort(self) -> None:
        """`close`, and fail the exchanges in progress too: a body being read raises
        IncompleteBody (its relay then breaks the client's response), a head awaited
        UpstreamClosed."""
        self.close()
        for conn in list(self._busy):
            if conn._head_done:
                conn._fail(IncompleteBody("the pool was closed mid-body"))
            else:
                conn._fail(UpstreamClosed("the pool was closed before a response"))


class Response:
    """A response head and its body, read with `read_chunk` (or `async for`).

    `headers` keeps the upstream's names, order and repeats, decoded as aiohttp's server
    decodes a request's (UTF-8, surrogateescape: encode so to get the bytes back, and valid
    UTF-8 is relayed as it came). After a 101 the body
    is the raw byte stream of the new protocol, and the connection is never reused."""

    __slots__ = ("_conn", "headers", "reason", "status", "version")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = conn._status
        self.reason = conn._reason.decode("utf-8", "surrogateescape")
        self.headers = conn._headers
        self.version = conn._version  # "1.1" or "1.0"

    @property
    def complete(self) -> bool:
        """Every body byte has arrived from the upstream (it may not all be read yet)."""
        conn = self._conn
        return conn is None or conn._complete

    def buffered(self) -> int:
        """Body bytes received and not read yet: a relay that finds some can send its head
        and the first chunk together."""
        conn = self._conn
        return 0 if conn is None else conn._buffered

    async def read_chunk(self) -> bytes:
        """The next body bytes as they came, or b"" at the end (the connection then goes
        back to the pool). Raises the exchange's H1Error (ReadTimeout, IncompleteBody...).
        After `release()` or `close()` the body reads as ended."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            error = conn._error
            if error is not None:
                self._conn = None
                conn._end(False)
                error.sent, error.reused = True, conn._reused
                raise error
            chunks = conn._chunks
            if chunks:
                chunk = chunks.popleft()
                conn._buffered -= len(chunk)
                if conn._reading_paused and conn._buffered < RESUME_BELOW:
                    conn._resume_reading()
                return chunk
            if conn._complete:
                self._conn = None
                conn._end(conn._reusable())
                return b""
            try:
                await conn._wait()
            except BaseException:  # cancelled mid-body: the rest of it is never read
                self._conn = None
                conn._end(False)
                raise

    readany = read_chunk  # the relay's Body protocol (gateway/http/pipeline.py), no extra frame

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The whole body (for small ones: health checks, tests); over `limit` bytes it
        raises ProtocolError and the connection is closed."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                self.close()
                raise ProtocolError(f"the response body is over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool when the whole body
        has arrived (unread buffered bytes are dropped) and it may be kept; otherwise it is
        closed. Twice is safe."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._end(conn._reusable())

    def close(self) -> None:
        """Done with the response, and the connection is closed whatever its state."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._end(False)


class _Connection(asyncio.BufferedProtocol):
    """One upstream connection: the protocol the loop reads into, the parser's callbacks,
    and the state of the exchange in progress. Private to this module: `Pool` starts
    exchanges, `Response` reads them; nothing else touches these fields."""

    __slots__ = (
        "_active",
        "_body_done",
        "_buffered",
        "_chunks",
        "_closed",
        "_complete",
        "_deadline",
        "_drain",
        "_error",
        "_extra",
        "_got_bytes",
        "_head_bytes",
        "_head_done",
        "_head_only",
        "_head_reads",
        "_headers",
        "_idle_since",
        "_informational",
        "_keep_alive",
        "_last",
        "_loop",
        "_parser",
        "_parser_spent",
        "_pool",
        "_pump",
        "_read_timeout",
        "_reading_paused",
        "_reason",
        "_reused",
        "_sent",
        "_status",
        "_timer",
        "_timer_at",
        "_transport",
        "_upgraded",
        "_version",
        "_view",
        "_waiter",
        "_write_paused",
    )

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._view = pool._view  # the pool's receive buffer, shared by its connections
        self._parser = httptools.HttpResponseParser(self)
        self._parser_spent = False
        self._closed = False
        self._active = False  # an exchange is in progress (the pool counts it as busy)
        self._reused = False
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._chunks: deque[bytes] = deque()
        self._reset(False, None, None)

    def _reset(self, head_only: bool, read: float | None, deadline: float | None) -> None:
        self._head_only = head_only
        self._read_timeout = read
        self._deadline = deadline
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._version = "1.1"
        self._head_done = False
        self._complete = False
        self._informational = 0
        self._upgraded = False
        self._keep_alive = False
        self._extra = False  # bytes beyond the response: the connection is not kept
        self._head_bytes = 0  # of header names and values (the parser's callbacks)
        self._head_reads = 0  # of reads that did not finish the head
        self._buffered = 0
        self._error: H1Error | None = None
        self._got_bytes = False
        self._sent = False
        self._body_done = True
        self._last = 0.0

    # --- the exchange ---------------------------------------------------------------------

    def start(
        self,
        head: bytes,
        body: Body,
        length: int | None,
        head_only: bool,
        read: float | None,
        deadline: float | None,
    ) -> asyncio.Future[None]:
        """Write the request (a streamed body goes on in a task) and return the future the
        response head (or the exchange's error) resolves."""
        if self._parser_spent:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_spent = False
        self._reset(head_only, read, deadline)
        self._active = True
        self._pool._busy.add(self)
        transport = self._transport
        assert transport is not None
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            if len(body) <= SMALL_BODY:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)
            self._body_done = False
            self._pump = self._loop.create_task(self._send_body(body, length))
        self._sent = True
        return self._wait()

    def _reusable(self) -> bool:
        return (
            self._complete
            and self._keep_alive
            and self._body_done
            and self._error is None
            and not self._extra
            and not self._upgraded
        )

    def _end(self, reusable: bool) -> None:
        """The exchange is over (the response was released, closed, or failed)."""
        if not self._active:
            return
        self._active = False
        self._waiter = None
        if self._chunks:
            self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and reusable:
            self._resume_reading()
        self._pool._ended(self, reusable)

    def _close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pump = self._pump
        if pump is not None:
            self._pump = None
            pump.cancel()
        transport = self._transport
        if transport is not None:
            transport.abort()  # close at once: nothing queued is worth sending now

    def _fail(self, error: H1Error) -> None:
        """The exchange failed: remember why, wake the reader, drop the connection."""
        if self._error is None:
            self._error = error
        self._wake()
        if not self._closed:
            self._close()

    def _wait(self) -> asyncio.Future[None]:
        waiter = self._loop.create_future()
        self._waiter = waiter
        read, deadline = self._read_timeout, self._deadline
        if read is None and deadline is None:
            return waiter
        now = self._loop.time()
        self._last = now
        when = now + read if read is not None else deadline
        if deadline is not None and when is not None and deadline < when:
            when = deadline
        assert when is not None
        timer = self._timer
        if timer is None or self._timer_at > when:  # an earlier timer re-arms itself later
            if timer is not None:
                timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._on_timer)
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._active or self._error is not None:
            return
        now = self._loop.time() + 0.001  # timers may fire a hair early
        deadline = self._deadline
        if deadline is not None and now >= deadline:
            self._fail(TotalTimeout("the exchange took longer than its total timeout"))
            return
        when = deadline
        read = self._read_timeout
        if self._waiter is not None and read is not None:
            if not self._body_done:  # still sending the request body: the clock starts after
                self._last = now
            expires = self._last + read
            if now >= expires:
                self._fail(ReadTimeout(f"no response bytes for {read:g}s"))
                return
            when = expires if when is None or expires < when else when
        if when is not None:
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._on_timer)

    async def _send_body(
        self, body: StreamReader | AsyncIterable[bytes], length: int | None
    ) -> None:
        """Stream the request body: with `length` exactly that many bytes, else chunked."""
        transport = self._transport
        assert transport is not None
        sent = 0
        try:
            source = _stream_chunks(body) if isinstance(body, StreamReader) else aiter(body)
            async for chunk in source:
                if self._closed or not self._active:
                    return
                if not chunk:
                    continue
                sent += len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                elif sent > length:
                    raise RequestBodyError("the request body is longer than its Content-Length")
                else:
                    transport.write(chunk)
                if self._write_paused:
                    drain = self._drain = self._loop.create_future()
                    await drain
            if length is not None and sent != length:
                raise RequestBodyError("the request body ended before its Content-Length")
            if self._closed or not self._active:
                return
            if length is None:
                transport.write(b"0\r\n\r\n")
            self._body_done = True
            self._last = self._loop.time()  # the read timeout runs from the body's end
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closed or not self._active:
                return
            self._body_done = False
            if self._complete:  # answered early: the response stands, the connection goes
                return
            if isinstance(exc, RequestBodyError):
                self._fail(exc)
            else:
                error = RequestBodyError("the request body could not be read")
                error.__cause__ = exc
                self._fail(error)
        finally:
            if self._pump is asyncio.current_task():
                self._pump = None

    def _resume_reading(self) -> None:
        self._reading_paused = False
        transport = self._transport
        if transport is not None and not self._closed:
            transport.resume_reading()

    # --- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._waiter is not None or not self._head_done:
            return self._view
        return self._pool._small_view

    def buffer_updated(self, nbytes: int) -> None:
        if not self._active or self._complete:  # bytes out of turn: nothing can trust them
            self._extra = True
            if not self._active:
                self._close()
            return
        self._got_bytes = True
        if self._upgraded:
            self._take_body(bytes(self._view[:nbytes]))
        else:
            self._parse(nbytes)
            if self._error is not None:
                return
        if self._buffered >= PAUSE_AT and not self._reading_paused and not self._complete:
            self._reading_paused = True
            transport = self._transport
            assert transport is not None
            transport.pause_reading()
        if self._head_done and (waiter := self._waiter) is not None:  # _wake, inline
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _parse(self, nbytes: int) -> None:
        try:
            self._parser.feed_data(self._view[:nbytes])
        except httptools.HttpParserUpgrade as upgrade:
            self._parser_spent = True
            self._upgraded = True
            offset = upgrade.args[0] if upgrade.args else nbytes
            if offset < nbytes:
                self._take_body(bytes(self._view[offset:nbytes]))
        except httptools.HttpParserError as exc:
            self._parser_spent = True
            self._parse_stopped(exc, nbytes)
        else:
            if not self._head_done:  # a head that never ends (or one huge header)
                self._head_reads += nbytes
                if self._head_reads > MAX_HEAD:
                    self._fail(ProtocolError(f"the response head is over {MAX_HEAD} bytes"))

    def _parse_stopped(self, exc: httptools.HttpParserError, nbytes: int) -> None:
        if self._error is not None:  # a callback decided (too many 1xx)
            self._fail(self._error)
        elif self._complete:  # a HEAD response's end, or bytes after a response
            if self._head_only and not self._extra:
                # Nothing may follow a HEAD response's head: it must end this read.
                self._extra = self._view[nbytes - 4 : nbytes].tobytes() != b"\r\n\r\n"
        elif self._status == 101 and self._head_done:  # 101 without an Upgrade header
            self._upgraded = True
        else:
            reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else "error"
            self._fail(ProtocolError(f"malformed response: {reason}"))

    def eof_received(self) -> bool | None:
        if not self._active:  # an idle connection the upstream closed: out of the pool now
            self._closed = True
            self._pool._forget(self)
        return None  # the transport closes itself; connection_lost decides what it means

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport_gone()
        self._parser = _NO_PARSER  # it held our bound methods: a cycle only the GC would free
        self._parser_spent = True
        if not self._active:
            self._pool._forget(self)
            return
        if self._complete:
            self._wake()
            return
        if self._upgraded or (self._head_done and exc is None and self._until_eof()):
            self._complete = True  # the body was delimited by the end of the connection
            self._keep_alive = False
            self._wake()
            return
        if self._head_done:
            self._fail(IncompleteBody("the connection ended mid-body"))
        elif exc is not None:
            reset = UpstreamClosed("the connection was reset before a response")
            reset.summary = "connection reset"
            self._fail(reset)
        else:
            self._fail(UpstreamClosed("the connection closed before a response"))

    def _transport_gone(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)  # the pump sees the connection closed, and stops

    def _until_eof(self) -> bool:
        """The response has no length: no Content-Length, no chunked Transfer-Encoding."""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length":
                return False
            if lowered == "transfer-encoding" and value.rsplit(",", 1)[-1].strip().lower() == (
                "chunked"
            ):
                return False
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second response where none was asked for
            self._extra = True
            raise _Stop

    def on_status(self, status: bytes) -> None:
        self._reason += status  # it may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # a chunked body's trailers are not relayed
            self._headers.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            )
            self._head_bytes += len(name) + len(value)
            if self._head_bytes > MAX_HEAD:
                self._error = ProtocolError(f"the response head is over {MAX_HEAD} bytes")
                raise _Stop

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and status != 101:  # 100 Continue, 103 Early Hints...: not the answer
            self._informational += 1
            if self._informational > MAX_INFORMATIONAL:
                self._error = ProtocolError("too many informational (1xx) responses")
                raise _Stop
            self._headers = []
            self._reason = b""
            return
        self._status = status
        self._version = parser.get_http_version()
        self._head_done = True
        if self._head_only:  # a HEAD response has no body, whatever its headers say
            self._complete = True
            self._keep_alive = _keeps_alive(self._headers, self._version)
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)  # _take_body, inline: once a read
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._head_done and self._status != 101:  # not the end of a 1xx response
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()

    def _take_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)


_NO_PARSER: Final = httptools.HttpResponseParser(None)  # a closed connection's parser


def _keeps_alive(headers: list[tuple[str, str]], version: str) -> bool:
    """Whether a response lets its connection be kept (llhttp decides for all but HEAD)."""
    tokens = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    if version == "1.1":
        return "close" not in tokens
    return version == "1.0" and "keep-alive" in tokens


async def _stream_chunks(body: StreamReader) -> AsyncIterator[bytes]:
    while chunk := await body.readany():
        yield chunk
