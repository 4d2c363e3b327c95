"""The request pipeline's types: what a handler and a stage are.

The list that orders the stages is in `runtime/assemble.py`, which imports the stages; the
stages import these types. Neither imports the other in a loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Stage = Callable[[Handler], Handler]
