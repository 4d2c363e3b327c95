"""npm's fast-gateway (Node), the peer issue 17 measures the gateway against: installed with
npm into a temporary directory outside the repo and run as a five-line proxy to one upstream.
`make bench` (bench/run.py) and bench/peers.py both start it; without `node` and `npm` on PATH,
or when the install fails, they say so and go on without it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

NAME: Final = "fast-gateway"
VERSION: Final = "5.0.1"
# The registry this was written against lacks fast-proxy-lite 1.1.3, which 5.0.1 asks for.
OVERRIDES: Final = '{"fast-proxy-lite": "1.1.2"}'
PROXY_JS: Final = """const gateway = require('fast-gateway')
const [upstream, port] = process.argv.slice(2)
gateway({ routes: [{ prefix: '', target: upstream }] })
  .start(Number(port)).then(() => console.log('listening', port))
"""
INSTALL_TIMEOUT: Final = 300.0  # seconds for `npm install`


def install(directory: Path) -> Path | None:
    """The proxy script, with fast-gateway installed beside it in `directory` (a temporary
    one), or None when node/npm are missing or the install fails (said on stdout)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        print(f"{NAME}: node or npm not on PATH: skipped", flush=True)
        return None
    package = (
        f'{{"name": "fgw-bench", "private": true, "dependencies": {{"{NAME}":'
        f' "{VERSION}"}}, "overrides": {OVERRIDES}}}'
    )
    (directory / "package.json").write_text(package)
    (directory / "proxy.js").write_text(PROXY_JS)
    try:
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"{NAME}: npm install took over {INSTALL_TIMEOUT:.0f} s: skipped", flush=True)
        return None
    if done.returncode != 0:
        print(f"{NAME}: npm install failed: skipped\n{done.stderr[-2000:]}", flush=True)
        return None
    return directory / "proxy.js"


def command(script: Path, upstream_url: str, port: int) -> list[str]:
    return ["node", str(script), upstream_url, str(port)]


def node_version() -> str:
    try:
        done = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"
