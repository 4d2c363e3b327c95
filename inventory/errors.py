"""Every failure the inventory answers, and the one middleware that turns it into a problem.

Errors are `application/problem+json` (RFC 9457) with the members `type`, `title`, `status`,
`detail` and, when the request carried an `X-Request-ID`, `request_id`. A 422 adds `errors`:
a list of `{"path", "message"}`. The inventory never imports the gateway, so this is its own
small copy of the idea.

InventoryError
  BadRequest 400
    MalformedJson 400 · InvalidQuery 400
  DeviceNotFound 404
  PreconditionFailed 412
  UnsupportedMediaType 415
  InvalidDevice 422
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import ClassVar, Final

from aiohttp import hdrs, web

from inventory.schema import JSON, FieldError

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
REQUEST_ID_HEADER: Final = "X-Request-ID"
MAX_REQUEST_ID_CHARS: Final = 200
# aiohttp's own HTTP errors carry these; a problem body has its own type and length.
_BODY_HEADERS: Final = frozenset({hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InventoryError(Exception):
    """Base of every failure the service answers itself; the status lives on the class."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str = "", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})

    def extensions(self) -> dict[str, JSON]:
        """Extra problem members (RFC 9457 §3.2) beyond the standard ones."""
        return {}


class BadRequest(InventoryError):
    status = 400
    title = "Bad Request"


class MalformedJson(BadRequest):
    """The body is not JSON at all (as opposed to JSON that breaks the schema: 422)."""


class InvalidQuery(BadRequest):
    """A query parameter (limit, cursor, type) has a value the service cannot use."""


class DeviceNotFound(InventoryError):
    status = 404
    title = "Not Found"


class PreconditionFailed(InventoryError):
    status = 412
    title = "Precondition Failed"


class UnsupportedMediaType(InventoryError):
    status = 415
    title = "Unsupported Media Type"


class InvalidDevice(InventoryError):
    """The body is JSON, but not an acceptable device; lists every error, not the first."""

    status = 422
    title = "Unprocessable Content"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        count = len(errors)
        super().__init__(f"the device has {count} error{'s' if count != 1 else ''}")
        self.errors = list(errors)

    def extensions(self) -> dict[str, JSON]:
        return {"errors": [error.as_json() for error in self.errors]}


def request_id(request: web.BaseRequest) -> str | None:
    """The client's `X-Request-ID`, if it sent a printable one of sane length."""
    value = request.headers.get(REQUEST_ID_HEADER, "").strip()
    if not value or len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable():
        return None
    return value


def problem_response(
    request: web.BaseRequest,
    status: int,
    title: str,
    detail: str = "",
    *,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, JSON] | None = None,
) -> web.Response:
    """An `application/problem+json` response (RFC 9457 §3)."""
    problem: dict[str, JSON] = {"type": "about:blank", "title": title, "status": status}
    problem["detail"] = detail or title
    rid = request_id(request)
    if rid is not None:
        problem["request_id"] = rid
    problem.update(extensions or {})
    try:
        body = json.dumps(problem, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # an error path quoting a lone surrogate the client sent
        body = json.dumps(problem).encode("ascii")  # `\ud800`: the escape the client used
    return web.Response(
        status=status, headers=headers, body=body, content_type=PROBLEM_CONTENT_TYPE
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only place exceptions become statuses; aiohttp's own 404/405/413 included."""
    try:
        return await handler(request)
    except InventoryError as exc:
        extensions = exc.extensions()
        return problem_response(
            request, exc.status, exc.title, exc.detail, headers=exc.headers, extensions=extensions
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {name: value for name, value in exc.headers.items() if name not in _BODY_HEADERS}
        detail = exc.text or ""
        if detail in (exc.reason, f"{exc.status}: {exc.reason}"):  # aiohttp's boilerplate
            detail = ""
        return problem_response(request, exc.status, exc.reason, detail, headers=kept)
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(request, 500, InventoryError.title)
