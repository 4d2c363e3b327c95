"""The dashboard in a real browser (chromium, see conftest.py) against a real gateway process
with two services: traffic shows as a rising rate, a killed target turns unhealthy, a broken
routes.yaml shows its FILE:LINE:COL error with the line's text, and a gateway that went away
shows the red banner.

The page is screenshotted with the rejected reload on it: to tmp_path, and to the file named
by DASHBOARD_SCREENSHOT when set (`DASHBOARD_SCREENSHOT=docs/dashboard.png` refreshes the
README's picture).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.gateway.conftest import base_url
from tests.polling import poll_until
from tests.processes.inventory_process import REPO_ROOT
from tests.processes.procs import GatewayProcess
from tests.upstreams import make_echo_app

if TYPE_CHECKING:
    from playwright.async_api import Page

FLAGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]  # and a fresh --user-data-dir: Playwright's user_data_dir, a new tmp directory
SEEN_WITHIN_MS: Final = 15_000.0  # the page polls every 2 s; health checks every 100 ms
TRAFFIC_REQUESTS: Final = 3000  # a bound on the load loop, which also stops when told

ROUTES: Final = """\
version: 1
services:
  lights:
    targets: [{lights}]
    health_check: {{path: /healthz, interval: 100ms, timeout: 1s,
                   healthy_threshold: 1, unhealthy_threshold: 1}}
  sensors:
    targets: [{sensors}]
    health_check: {{path: /healthz, interval: 100ms, timeout: 1s,
                   healthy_threshold: 1, unhealthy_threshold: 1}}
routes:
  - {{prefix: /lights, service: lights, methods: [GET, POST]}}
  - {{prefix: /sensors, service: sensors, rate_limit: {{limit: 50, per: 1s}}}}
"""
BROKEN_LINE: Final = "  - {prefix: sensors, service: sensors}"


@pytest.fixture
async def upstreams(aiohttp_server: AiohttpServer) -> tuple[TestServer, TestServer]:
    return await aiohttp_server(make_echo_app()), await aiohttp_server(make_echo_app())


@pytest.fixture
async def gateway(
    tmp_path: Path, upstreams: tuple[TestServer, TestServer]
) -> AsyncIterator[GatewayProcess]:
    lights, sensors = upstreams
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES.format(lights=base_url(lights), sensors=base_url(sensors)))
    process = await GatewayProcess.start(config)
    yield process
    await process.kill()


async def _traffic(url: str, stop: asyncio.Event) -> None:
    """Requests one after another until told to stop (or the bound is reached)."""
    async with aiohttp.ClientSession() as session:
        for i in range(TRAFFIC_REQUESTS):
            if stop.is_set():
                return
            path = "/lights/on" if i % 3 else "/sensors/temp"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}{path}") as resp:
                    await resp.read()
            await asyncio.sleep(0.01)  # a steady trickle, not a benchmark


async def test_the_dashboard_shows_traffic_a_dead_target_and_a_rejected_reload(
    chromium: str,
    tmp_path: Path,
    gateway: GatewayProcess,
    upstreams: tuple[TestServer, TestServer],
) -> None:
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = await browser.new_page()
            await page.goto(f"{gateway.admin_url}/")
            route = page.locator('tr[data-route="routes.0"]')
            await expect(route).to_contain_text("/lights", timeout=SEEN_WITHIN_MS)
            await expect(route).to_contain_text("GET HEAD POST")
            await expect(route).to_contain_text("forward")
            await expect(page.locator('tr[data-route="routes.1"]')).to_contain_text("rate_limit")
            await expect(page.locator("#ratelimit-panel")).to_be_visible()
            await expect(page.locator("#cache-panel")).to_be_hidden()  # no route caches
            rate = route.locator('[data-field="rate"]')
            before = _number(await rate.text_content())

            stop = asyncio.Event()
            load = asyncio.create_task(_traffic(gateway.url, stop))
            try:
                shown = await poll_until(
                    rate.text_content, lambda t: _number(t) > max(before, 1.0), within=15.0
                )
                assert _number(shown) > max(before, 1.0), (before, shown)
                await expect(route.locator('[data-field="p99"]')).to_contain_text("ms")
                healthy = page.locator('tr[data-target="sensors#0"]')
                await expect(healthy).to_have_attribute("data-health", "healthy")

                await upstreams[1].close()  # the sensors service's only target dies
                await expect(healthy).to_have_attribute(
                    "data-health", "unhealthy", timeout=SEEN_WITHIN_MS
                )
                await expect(healthy).to_contain_text("unhealthy")
                lights = page.locator('tr[data-target="lights#0"]')
                await expect(lights).to_have_attribute("data-health", "healthy")

                config = tmp_path / "routes.yaml"
                text = config.read_text().replace(
                    "  - {prefix: /sensors, service: sensors, rate_limit: {limit: 50, per: 1s}}",
                    BROKEN_LINE,
                )
                config.write_text(text)
                gateway.send_signal(signal.SIGHUP)
                errors = page.locator("#reload-errors")
                await expect(errors).to_be_visible(timeout=SEEN_WITHIN_MS)
                line = text.split("\n").index(BROKEN_LINE) + 1
                await expect(errors).to_contain_text(f"{config}:{line}:14: routes.1.prefix")
                await expect(errors.locator("pre")).to_contain_text(f"{line} | {BROKEN_LINE}")
                await expect(page.locator("#config-reload-result")).to_have_text("rejected")
                await expect(route).to_be_visible()  # the old table keeps serving
                await expect(page.locator("#banner")).to_be_hidden()
                await _screenshot(page, tmp_path)
            finally:
                stop.set()
                await load

            await gateway.stop()
            banner = page.locator("#banner")
            await expect(banner).to_be_visible(timeout=SEEN_WITHIN_MS)
            await expect(banner).to_contain_text("cannot be reached")
        finally:
            await browser.close()


def _number(text: str | None) -> float:
    try:
        return float((text or "").strip())
    except ValueError:
        return 0.0  # a dash: no figure yet


async def _screenshot(page: Page, tmp_path: Path) -> None:
    shot = await page.screenshot(full_page=True)
    (tmp_path / "dashboard.png").write_bytes(shot)
    target = os.environ.get("DASHBOARD_SCREENSHOT")
    if target:
        path = Path(target) if Path(target).is_absolute() else REPO_ROOT / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(shot)
