"""/stats with --workers 2: whichever worker answers, it counts both workers' requests, the
same figures /metrics prints (both read the merged multiprocess files)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.polling import poll_until
from tests.processes.procs import GatewayProcess
from tests.processes.test_gateway_process import (
    ROUTES,
    echo,  # noqa: F401  # the fixture
    requests_per_worker,
    requests_total,
    status,
    write_routes,
)


async def test_stats_counts_every_workers_requests_as_metrics_does(
    tmp_path: Path,
    echo: TestServer,  # noqa: F811  # the fixture imported above
) -> None:
    config = tmp_path / "routes.yaml"
    write_routes(config, ROUTES, echo)
    metrics_dir = tmp_path / "metrics"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    gateway = await GatewayProcess.start(config, workers=2, env=env)
    try:
        # A new connection per request: the kernel spreads them, and the scrapes, over both.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            codes = [await status(session, f"{gateway.url}/echo/{i}") for i in range(40)]

            async def counted() -> float:
                async with session.get(f"{gateway.admin_url}/stats") as resp:
                    stats = await resp.json()
                return float(stats["routes"].get("routes.0", {}).get("requests", 0))

            first = await poll_until(counted, lambda n: n == 40, within=5.0)
            seen = [await counted() for _ in range(6)]
            scraped = await requests_total(session, gateway)
    finally:
        await gateway.kill()

    assert set(codes) == {200}
    assert all(count > 0 for count in requests_per_worker(metrics_dir).values())
    assert len(requests_per_worker(metrics_dir)) == 2
    assert (first, seen, scraped) == (40, [40] * 6, 40)
