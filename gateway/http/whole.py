"""A response whose body is whole in memory (a cache hit, a preflight, an aggregate or compose
answer), sent the way aiohttp's `web.Response` sends a bytes body: head and body in one write.

`web.Response` is general (text, payloads, compression, cookies, chunking); none of that applies
to bytes the gateway already holds, and on a cache hit its layers were a fifth of the gateway's
own CPU. `WholeResponse` keeps only what a bytes body needs and keeps aiohttp's contract:

- `prepare` runs the application's on_response_prepare handlers (apply_exchange) on the real
  header multidict, so every edit of the Exchange applies as to any other response;
- keep-alive and `Connection` are decided as aiohttp decides them (`keep-alive` said to an
  HTTP/1.0 client that asked for it, `close` to an HTTP/1.1 one that did not), and the status
  line speaks the request's version;
- Content-Length, Content-Type and the empty bodies of HEAD, 204 and 304 follow
  `web.Response._start` and `StreamResponse._prepare_headers` (RFC 9110 §8.6, §15.4.5);
- aiohttp's connection loop writes it (`write_eof`) and reads `keep_alive` afterwards, so
  pipelined requests and `Connection: close` are handled by aiohttp itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time, should_remove_content_length
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict


class WholeResponse(web.StreamResponse):
    """`status`, `headers` and a whole `body`; sent by `prepare` and `write_eof`, as aiohttp's
    connection loop calls them."""

    def __init__(
        self, status: int, reason: str | None, headers: Iterable[tuple[str, str]], body: bytes
    ) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._whole = body

    @property
    def body(self) -> bytes:
        return self._whole

    @property
    def content_length(self) -> int | None:
        """The Content-Length header if one was given, else the body's length (as for
        `web.Response`: what the access line counts before the answer is sent)."""
        length = self._headers.get(hdrs.CONTENT_LENGTH)
        return len(self._whole) if length is None else int(length)

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        raise RuntimeError("the length of a whole response is its body's")

    async def _start(self, request: web.BaseRequest) -> AbstractStreamWriter:
        self._req = request
        writer = self._payload_writer = request.writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        headers, status, method, body = self._headers, self._status, request.method, self._whole
        if should_remove_content_length(method, status):  # 1xx, 204, 304 (RFC 9110 §8.6)
            headers.popall(hdrs.CONTENT_LENGTH, None)
        elif hdrs.CONTENT_LENGTH not in headers and (body or method != hdrs.METH_HEAD):
            headers[hdrs.CONTENT_LENGTH] = str(len(body))  # a HEAD of an empty body says none
        if self._must_be_empty_body:  # set by prepare(): HEAD, 1xx, 204, 304
            headers.popall(hdrs.TRANSFER_ENCODING, None)
        elif self.content_length:
            headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
        version = request.version
        add_server_headers(headers, version, keep_alive)
        await request._prepare_hook(self)
        # Buffered: it goes out with the body, in one write (write_eof).
        await writer.write_headers(
            f"HTTP/{version[0]}.{version[1]} {status} {self._reason}", headers
        )
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        assert not data, "a whole response writes its own body"
        if self._eof_sent:
            return
        await super().write_eof(b"" if self._must_be_empty_body else self._whole)


def add_server_headers(headers: CIMultiDict[str], version: HttpVersion, keep_alive: bool) -> None:
    """What aiohttp's StreamResponse adds to every head: Date and Server unless set, and the
    Connection header its keep-alive decision needs for this version (RFC 9112 §9.3)."""
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    if hdrs.CONNECTION not in headers:
        if keep_alive:
            if version == HttpVersion10:
                headers[hdrs.CONNECTION] = "keep-alive"
        elif version == HttpVersion11:
            headers[hdrs.CONNECTION] = "close"
