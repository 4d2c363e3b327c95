"""Optional `admin_auth: {token_sha256: HEX}`: the admin listener's bearer token.

When set, every admin request needs `Authorization: Bearer TOKEN` whose SHA-256 is that hash,
except the probes (/healthz, /readyz: load balancers and orchestrators ask them without a
token, and they tell nothing secret) and the dashboard's own files (/, /static/...: the page
holds no data; it asks for the token and sends it with every request it makes). The hash is
read from the config being served, so a reload can set, change or drop it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from gateway.http.errors import Unauthenticated, problem_response
from gateway.runtime.state import GATEWAY

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIX: Final = "/static/"
_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="gateway admin"'}


def token_matches(authorization: str | None, token_sha256: str) -> bool:
    """Whether the header is `Bearer TOKEN` with sha256(TOKEN) == token_sha256 (in constant
    time)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    return hmac.compare_digest(digest, token_sha256)


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app[GATEWAY].config.admin_token_sha256
    if expected is None or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX):
        return await handler(request)
    if not token_matches(request.headers.get(hdrs.AUTHORIZATION), expected):
        error = Unauthenticated("the admin API needs its bearer token", headers=_CHALLENGE)
        return problem_response(request, error)
    return await handler(request)
