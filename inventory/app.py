"""The inventory application: routes, the problem middleware, and the store's lifetime.

`create_app` builds the `web.Application`; the store opens when the app starts and closes
when it stops (`cleanup_ctx`), including on SIGINT/SIGTERM under `web.run_app`, so the last
write is committed and the SQLite WAL is folded back into the file before the process exits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from inventory.errors import problem_middleware
from inventory.handlers import STORE, routes
from inventory.schema import MAX_BODY_BYTES
from inventory.store import DeviceStore

__all__ = ["MAX_BODY_BYTES", "create_app", "store_context"]

logger = logging.getLogger(__name__)


def store_context(db_path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that opens the store at `db_path` and always closes it."""

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = await DeviceStore.open(db_path)
        try:
            yield
        finally:
            await app[STORE].close()
            logger.info("store %s closed", db_path)

    return open_store


def create_app(db_path: Path) -> web.Application:
    """The inventory service on the shelve store at `db_path` (created if missing)."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    app.cleanup_ctx.append(store_context(db_path))
    app.router.add_routes(routes())
    return app
