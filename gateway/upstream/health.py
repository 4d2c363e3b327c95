"""Active health checks: one background task per service probes every target with GET.

A target goes down after `unhealthy_threshold` failed probes in a row and comes back after
`healthy_threshold` good ones (2xx or 3xx within `timeout`); while down it gets no traffic.
A probe is independent of the circuit breaker: either one can keep a target out. Tasks stop
on shutdown (`stop()`) and when a reload removes the service or changes its config
(`sync()` with the new services: a changed service is a new `Service`, with a fresh task; its
targets that kept their URL keep their verdict, see `upstream._targets`).

Probes never wait for a slot in the traffic pool (whose `max_connections` long streams may
fill): each task has its own small keep-alive pool, one connection per target, opened on the
loop when the task starts and closed when it stops. A bug in a round of probes is logged
with its traceback and the next round runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Final

import aiohttp
from yarl import URL

from gateway.config.model import HealthCheckConfig
from gateway.upstream.service import Service, Target

upstream_log = logging.getLogger("gateway.upstream")

_PROBE_READ_LIMIT: Final = 65536  # bytes of a probe's body read so its connection is reused


class HealthChecker:
    """Keeps one probe task per service that has a health_check; `sync()` after each swap."""

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[Service, asyncio.Task[None]]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not yet finished

    @property
    def watched(self) -> frozenset[str]:
        """Names of the services whose targets are being probed now."""
        return frozenset(self._tasks)

    def sync(self, services: Iterable[Service]) -> None:
        """Probe exactly `services` (those with a health_check): start new, stop gone ones."""
        current = {s.name: s for s in services if s.config.health_check is not None}
        for name, (service, _) in list(self._tasks.items()):
            if current.get(name) is not service:
                self._cancel(name)
        for name, service in current.items():
            if name not in self._tasks:
                task = asyncio.get_running_loop().create_task(
                    _probe_forever(service), name=f"health-check {name}"
                )
                self._tasks[name] = (service, task)

    async def stop(self) -> None:
        """Cancel every probe task and wait until they have all finished."""
        for name in list(self._tasks):
            self._cancel(name)
        tasks = list(self._stopping)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name)[1]
        task.cancel()
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)


def probe_session(targets: int) -> aiohttp.ClientSession:
    """The probes' own pool: a round probes each target once, so one connection a target is
    all it takes, and it is kept alive from one round to the next."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=targets, limit_per_host=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


async def _probe_forever(service: Service) -> None:
    check = service.config.health_check
    assert check is not None  # sync() starts tasks only for services that have one
    streaks: dict[Target, int] = {}  # >0: successes in a row, <0: failures in a row
    # DNS discovery changes the targets between rounds: no fixed pool size then (0: no limit)
    size = 0 if service.config.discovery is not None else len(service.targets)
    async with probe_session(size) as session:
        while True:
            targets = service.targets  # this round's (discovery may replace the tuple)
            try:
                results = await asyncio.gather(*(probe(session, t, check) for t in targets))
                streaks = {
                    t: judge(t, check, ok, streaks.get(t, 0))
                    for t, ok in zip(targets, results, strict=True)
                }
            except Exception:  # a bug: say so, and keep probing (asyncio would stay silent)
                upstream_log.exception("health check of service %r failed", service.name)
            await asyncio.sleep(check.interval)


def judge(target: Target, check: HealthCheckConfig, ok: bool, streak: int) -> int:
    """Mark `target` down or up when a streak reaches its threshold; return the new streak."""
    streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
    if target.healthy and streak <= -check.unhealthy_threshold:
        target.healthy = False
        upstream_log.warning("target %s is down: %d failed health checks", target.label, -streak)
    elif not target.healthy and streak >= check.healthy_threshold:
        target.healthy = True
        upstream_log.info("target %s is healthy again", target.label)
    return streak


async def probe(session: aiohttp.ClientSession, target: Target, check: HealthCheckConfig) -> bool:
    """One GET of the check path: True for 2xx or 3xx within the check's timeout."""
    timeout = aiohttp.ClientTimeout(total=check.timeout)
    try:
        async with session.get(
            URL(target.url + check.path, encoded=True), timeout=timeout, allow_redirects=False
        ) as response:
            await response.content.read(_PROBE_READ_LIMIT)
            return response.status < 400
    except (aiohttp.ClientError, TimeoutError):
        return False
