"""Active health checks: one background task per service probes every target with GET.

A target goes down after `unhealthy_threshold` failed probes in a row and comes back after
`healthy_threshold` good ones (2xx or 3xx in time). Tasks stop on shutdown and when a reload
removes or changes the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import aiohttp
from yarl import URL

from gateway.model import HealthCheckConfig
from gateway.upstream import Service, Target

upstream_log = logging.getLogger("gateway.upstream")


class HealthChecker:
    """Keeps one probe task per service that has a health_check; `sync()` after each swap."""

    def __init__(self) -> None:
        self._tasks: dict[int, tuple[Service, asyncio.Task[None]]] = {}

    def sync(self, services: Iterable[Service]) -> None:
        current = {id(s): s for s in services if s.config.health_check is not None}
        for key in list(self._tasks):
            if key not in current:
                self._tasks.pop(key)[1].cancel()
        for key, service in current.items():
            if key not in self._tasks:
                task = asyncio.get_running_loop().create_task(_probe_forever(service))
                self._tasks[key] = (service, task)

    async def stop(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _probe_forever(service: Service) -> None:
    check = service.config.health_check
    assert check is not None
    streaks = {id(t): 0 for t in service.targets}  # >0: successes in a row, <0: failures
    while True:
        results = await asyncio.gather(*(probe(service, t, check) for t in service.targets))
        for target, ok in zip(service.targets, results, strict=True):
            streaks[id(target)] = _judge(service, target, check, ok, streaks[id(target)])
        await asyncio.sleep(check.interval)


def _judge(
    service: Service, target: Target, check: HealthCheckConfig, ok: bool, streak: int
) -> int:
    streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
    if target.healthy and streak <= -check.unhealthy_threshold:
        target.healthy = False
        upstream_log.warning("target %s is down: %d failed health checks", target.label, -streak)
    elif not target.healthy and streak >= check.healthy_threshold:
        target.healthy = True
        upstream_log.info("target %s is healthy again", target.label)
    return streak


async def probe(service: Service, target: Target, check: HealthCheckConfig) -> bool:
    timeout = aiohttp.ClientTimeout(total=check.timeout)
    try:
        async with service.session.get(
            URL(target.url + check.path, encoded=True), timeout=timeout, allow_redirects=False
        ) as response:
            return response.status < 400
    except (aiohttp.ClientError, TimeoutError):
        return False
