"""A cache hit on the wire: the entry's status line and headers encoded once, and each answer
made of them, its own few values and the body, sent in one write.

A hit answered through the relay is built like any whole response (gateway/http/whole.py): a
header multidict, the public app's on_response_prepare handler (`apply_exchange`) editing it,
then aiohttp's serializer. For a small body that machinery is about a tenth of a hit's CPU, and
on every hit of an entry it makes the same lines. `Wire` keeps those lines per entry, request
version and method, and the Exchange's removals and rules (`Head`), and adds what differs per
answer, exactly where the general path would put it:

    status line, the entry's headers       the entry's; less Server and X-Request-ID, which
                                           apply_exchange drops or replaces on an entry, and
                                           less what the Exchange removes or its rules set
    Age, Content-Length[, Content-Type]    Content-Type: aiohttp's default, for a body the
                                           upstream did not type
    Date[, Connection]                     as aiohttp adds them (keep-alive to an HTTP/1.0
                                           client that asked for it, close to an HTTP/1.1 one
                                           that did not)
    X-Request-ID, the stages' headers,     what apply_exchange adds: X-Cache, RateLimit-*,
      the route's set rules                CORS, less what the route's rules remove

It answers only where that is the whole story: a request whose application prepares responses
with `apply_exchange` alone, a body (not a 304, not a 204 entry) of at most BODY_BYTES, no
Exchange edit of a header written here, and no control character anywhere; otherwise the
stage answers through the relay as before. The answer (`EncodedAnswer`) has no header
multidict: what is sent is in its bytes. The hit lane (servers/hitlane.py) writes the same
bytes (`encode`) without a response object. tests/gateway/test_cache_wire.py compares both ways,
header for header, over routes with CORS, rate limits and header rules, HEAD, HTTP/1.0 and
Connection: close.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11

from gateway.cache.policy import Entry
from gateway.config.model import HeaderRules
from gateway.http.exchange import Exchange, apply_exchange

HEADS_KEPT: Final = 4096  # encoded heads per route: entries x versions x methods
# Larger bodies go through the relay: there the head is small beside the body, and the body
# is not copied to be joined to it (aiohttp hands both to one writev).
BODY_BYTES: Final = 16384
REPLACED: Final = frozenset({"server", "x-request-id"})  # never replayed from an entry
# Written here, so an Exchange that removes or sets one of them is left to the general path.
WRITTEN_HERE: Final = frozenset(
    {"age", "connection", "content-length", "content-type", "date", "server",
     "transfer-encoding", "x-request-id"}
)  # fmt: skip
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # aiohttp's header check
_BODILESS: Final = frozenset({204, 304, *range(100, 200)})


@dataclass(frozen=True, slots=True)
class Head:
    """What every answer from one entry to one kind of request starts and ends with."""

    entry: weakref.ref[Entry]  # the key holds its id: a dead entry's id may come back
    rules: HeaderRules | None  # held: the key holds its id too
    usable: bool  # False: the Exchange removes or sets a header this module writes itself
    start: bytes  # status line, the entry's kept headers, Age's name
    fixed: str  # after Age's value: Content-Length[, Content-Type], Date's name
    dropped: frozenset[str]  # lower-case names the rules remove or set: not from the stages
    end: str  # the rules' set headers and the blank line


HeadKey = tuple[int, int, bool, frozenset[str], int]


class Wire:
    """One cached route's encoded heads, at most HEADS_KEPT (the oldest go first)."""

    def __init__(self) -> None:
        self._heads: dict[HeadKey, Head] = {}

    def answer(
        self, request: web.Request, exchange: Exchange, entry: Entry, age: int
    ) -> EncodedAnswer | None:
        """The hit's answer, or None when it must go through the relay (see the module)."""
        if not _prepared_by_exchange_alone(request):
            return None
        keep_alive = request.keep_alive
        head_only = request.method == hdrs.METH_HEAD
        wire = self.encode(exchange, entry, age, request.version, head_only, keep_alive)
        if wire is None:
            return None
        return EncodedAnswer(entry.status, entry.reason, wire, len(entry.body), keep_alive)

    def encode(
        self,
        exchange: Exchange,
        entry: Entry,
        age: int,
        version: HttpVersion,
        head_only: bool,
        keep_alive: bool,
    ) -> bytes | None:
        """The bytes of the hit's answer to a request of that version and method (HEAD:
        `head_only`) whose connection stays open or not, for an application that prepares
        responses with `apply_exchange` alone; None where the relay must answer."""
        if (
            entry.status in _BODILESS
            or len(entry.body) > BODY_BYTES
            or exchange.from_upstream  # never on a hit; apply_exchange would keep its Server
        ):
            return None
        extra = exchange.response_headers
        for name, value in extra:
            if _FORBIDDEN.search(name) or _FORBIDDEN.search(value):
                return None  # the general path refuses it, as aiohttp does
        rules, removed = exchange.response_rules, exchange.response_remove
        key = (id(entry), version.minor, head_only, removed, id(rules))
        head = self._heads.get(key)
        if head is None or head.entry() is not entry or head.rules is not rules:
            head = self._encode(key, entry, version.minor, head_only, removed, rules)
        if not head.usable:
            return None
        connection = ""
        if keep_alive:
            if version == HttpVersion10:
                connection = "Connection: keep-alive\r\n"
        elif version == HttpVersion11:
            connection = "Connection: close\r\n"
        dropped = head.dropped
        stages = "".join(
            [f"{n}: {v}\r\n" for n, v in extra if not dropped or n.lower() not in dropped]
        )
        tail = (
            f"{age}\r\n{head.fixed}{rfc822_formatted_time()}\r\n{connection}"
            f"X-Request-ID: {exchange.request_id}\r\n{stages}{head.end}"
        )
        body = b"" if head_only else entry.body
        return b"".join((head.start, tail.encode("utf-8", "ignore"), body))

    def _encode(
        self,
        key: HeadKey,
        entry: Entry,
        minor: int,
        head_only: bool,
        removed: frozenset[str],
        rules: HeaderRules | None,
    ) -> Head:
        set_rules = () if rules is None else rules.set
        by_rules = {n.lower() for n in rules.remove} if rules is not None else set()
        by_rules |= {n.lower() for n, _ in set_rules}
        edited = {n.lower() for n in removed} | by_rules
        kept = [(n, v) for n, v in entry.headers if n.lower() not in REPLACED | edited]
        written = [entry.reason, *(x for pair in (*kept, *set_rules) for x in pair)]
        clean = not any(_FORBIDDEN.search(x) for x in written)  # else aiohttp's error, there
        status = f"HTTP/1.{minor} {entry.status} {entry.reason}\r\n"
        lines = "".join(f"{n}: {v}\r\n" for n, v in kept)
        fixed = f"Content-Length: {len(entry.body)}\r\n" if entry.body or not head_only else ""
        typed = any(n.lower() == "content-type" for n, _ in entry.headers)
        if entry.body and not head_only and not typed:
            fixed += "Content-Type: application/octet-stream\r\n"  # aiohttp's default
        head = Head(
            entry=weakref.ref(entry),
            rules=rules,
            usable=clean and not edited & WRITTEN_HERE,
            # Errors ignored as aiohttp's serializer ignores them: an upstream's undecodable
            # bytes (surrogate-escaped by the upstream client) are not sent.
            start=f"{status}{lines}Age: ".encode("utf-8", "ignore"),
            fixed=f"{fixed}Date: ",
            dropped=frozenset(by_rules),
            end="".join(f"{n}: {v}\r\n" for n, v in set_rules) + "\r\n",
        )
        if len(self._heads) >= HEADS_KEPT:
            del self._heads[next(iter(self._heads))]
        self._heads[key] = head
        return head


def _prepared_by_exchange_alone(request: web.Request) -> bool:
    """Whether `apply_exchange` is the only on_response_prepare handler that would see this
    request's response (the public app's case): only then may a hit skip it."""
    for app in request.match_info.apps:
        handlers = app.on_response_prepare
        if len(handlers) != 1 or handlers[0] is not apply_exchange:
            return False
    return True


class EncodedAnswer(web.StreamResponse):
    """A hit whose bytes `Wire` made: `prepare` sends nothing, `write_eof` sends head and body
    in one write (aiohttp's connection loop calls both, then reads `keep_alive`)."""

    def __init__(
        self, status: int, reason: str, wire: bytes, length: int, keep_alive: bool
    ) -> None:
        super().__init__(status=status, reason=reason)
        self._wire = wire
        self._length = length
        self._keep_alive = keep_alive

    @property
    def content_length(self) -> int | None:
        """The entry's body length, a HEAD's too (as for the relay's whole responses)."""
        return self._length

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        raise RuntimeError("an encoded answer's length is its entry's")

    async def _start(self, request: web.BaseRequest) -> AbstractStreamWriter:
        self._req = request
        writer = self._payload_writer = request.writer
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        assert not data, "an encoded answer writes its own bytes"
        if self._eof_sent:
            return
        await super().write_eof(self._wire)
