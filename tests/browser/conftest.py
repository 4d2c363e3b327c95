"""A real browser for the dashboard tests: Debian's chromium, driven by Playwright.

Playwright drives the system's /usr/bin/chromium (`executable_path`); it never downloads a
browser of its own. When chromium is missing, the session installs it with apt-get only when
that can work and is wanted: running as root, with CI=true or GATEWAY_INSTALL_CHROMIUM=1 (a
bounded `apt-get install -y chromium`). Otherwise the tests are skipped, saying how to enable
them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest

CHROMIUM: Final = "/usr/bin/chromium"
INSTALL_SECONDS: Final = 600.0
HOW: Final = (
    "install it with `apt-get install -y chromium` (or set GATEWAY_INSTALL_CHROMIUM=1 when "
    "running as root) and `pip install -e '.[dev]'` for playwright"
)


def _install_chromium() -> str | None:
    """apt-get install chromium when allowed; the reason it was not, or None on success."""
    wanted = os.environ.get("CI") == "true" or os.environ.get("GATEWAY_INSTALL_CHROMIUM") == "1"
    if not wanted:
        return "not installing it: set GATEWAY_INSTALL_CHROMIUM=1 (or CI=true)"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "cannot install it here: needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(
                args, env=env, capture_output=True, text=True, timeout=INSTALL_SECONDS
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(args)} took over {INSTALL_SECONDS:.0f}s"
        if done.returncode != 0:
            return f"{' '.join(args)} failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium executable Playwright launches; skips, saying how, when there is none."""
    try:
        import playwright.async_api  # noqa: F401  # only to know it is there
    except ImportError:
        pytest.skip(f"playwright is not installed: {HOW}")
    if not Path(CHROMIUM).exists():
        why = _install_chromium()
        if why is not None or not Path(CHROMIUM).exists():
            pytest.skip(f"{CHROMIUM} is missing ({why or 'not installed'}): {HOW}")
    return CHROMIUM
