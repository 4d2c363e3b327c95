"""store.redis URLs: what redis-py reads itself (redis://, rediss://, unix://), plus Sentinel.

redis-py has no URL form for Sentinel, so the gateway defines one:

    redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]
    rediss+sentinel://...   the same over TLS (to the sentinels and to the master)

The password (if any) is the master's, and is also sent to the sentinels. Pure parsing: this
module imports nothing of the gateway, so config validation and the Redis store share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

PLAIN_SCHEMES: Final = ("redis", "rediss", "unix")
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
SENTINEL_FORM: Final = "SCHEME://HOST:PORT[,HOST:PORT...]/MASTER[/DB]"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_sentinel(url: str) -> SentinelURL:
    """Split a redis+sentinel:// URL; ValueError (naming no part of the URL) when malformed."""
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError("not a Sentinel URL")
    authority, _, path = rest.partition("/")
    userinfo, _, hosts = authority.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_hostport(h) for h in hosts.split(",") if h)
    parts = [p for p in path.split("?")[0].split("/") if p]
    if not sentinels or not parts or len(parts) > 2:
        raise ValueError(f"Sentinel URLs take the form {SENTINEL_FORM}")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError("the database must be a number")
    return SentinelURL(
        sentinels=sentinels,
        master=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        tls=scheme == "rediss+sentinel",
    )


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("each sentinel must be HOST:PORT with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def redis_url_problem(url: str) -> str | None:
    """Why `url` cannot be store.redis, or None. Never quotes the URL (it may hold a password)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel(url)
        except ValueError as exc:
            return f"bad Redis URL: {exc}"
        return None
    if scheme not in PLAIN_SCHEMES:
        schemes = ", ".join((*PLAIN_SCHEMES, *SENTINEL_SCHEMES))
        return f"bad Redis URL: the scheme must be one of {schemes}"
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except ValueError:
        return "bad Redis URL: cannot be parsed (check the port)"
    if scheme == "unix":
        return None if parsed.path else "bad Redis URL: a unix:// URL names a socket path"
    if not parsed.hostname:
        return "bad Redis URL: it names no host"
    db = parsed.path.strip("/")
    if db and not db.isdigit():
        return "bad Redis URL: the path must be a database number"
    return None
