"""The wheel is complete (CONTRACT §12): built from the repository and installed into a fresh
venv, both programs run from a directory outside the repository with nothing but the installed
package, schemas included.

How the venv is made, and why it still proves the point: the wheel is built the way `pip
install .` builds it (pip, with build isolation, so the `[build-system]` requirements from
pyproject.toml are the ones used; pip fetches setuptools from PyPI or its cache). The fresh
venv gets the wheel with `--no-deps`, and only then a `.pth` line that appends the dev venv's
site-packages, so aiohttp and the other third-party dependencies need no download. A `.pth`
path line does not run that directory's own `.pth` files, so the editable install's finder
(which maps `gateway` to the source tree) stays off: the tests check that `gateway` and
`inventory` are imported from the new venv. The programs run from an empty directory in /tmp
with no PYTHONPATH, through the console scripts pip wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.config.validate import SCHEMA_PATH
from inventory.schema import DEVICE_SCHEMA_PATH
from tests.polling import free_port, poll_until
from tests.processes.inventory_process import REPO_ROOT

# What the build reads. A build input added later goes here too (the build fails without it).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "schemas", "examples")
PACKAGES = ("gateway", "inventory")  # each carries the schemas
SHARED = ("sqlshelf",)  # packages both import (no schemas)
BUILD_SECONDS = 120.0  # a bound, not the expectation: a warm pip cache builds in ~5 s
START_SECONDS = 15.0
STOP_SECONDS = 15.0


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    elsewhere: Path  # an empty working directory outside the repository

    def script(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self) -> dict[str, str]:
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        return {k: v for k, v in os.environ.items() if k not in drop}


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_SECONDS
    )
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert REPO_ROOT not in root.parents, "the test must run outside the repository"
    source = root / "source"  # a clean copy: no stale build/ or egg-info from the work tree
    source.mkdir()
    for name in (*BUILD_INPUTS, *PACKAGES, *SHARED):
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    pip = (sys.executable, "-m", "pip")
    _run(*pip, "wheel", "--no-deps", "--wheel-dir", str(root / "dist"), ".", cwd=source, env=env)
    (wheel,) = (root / "dist").glob("*.whl")

    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=root)
    python = str(venv / "bin" / "python")
    _run(*pip, "--python", python, "install", "--no-deps", "--no-index", str(wheel), cwd=root)
    # Only now, so that pip above never saw (nor touched) the dev venv's editable install.
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    dev = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site.strip()) / "_dev_dependencies.pth").write_text("".join(f"{p}\n" for p in dev))

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(REPO_ROOT / "routes.yaml", elsewhere / "routes.yaml")
    return Installed(wheel, venv, elsewhere)


def test_the_wheel_carries_the_schemas_the_typing_markers_the_dashboard_and_every_subpackage(
    installed: Installed,
) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        for schema in sorted((REPO_ROOT / "schemas").glob("*.json")):
            for package in PACKAGES:
                packaged = f"{package}/_schemas/{schema.name}"
                assert wheel.read(packaged) == schema.read_bytes(), packaged
        static = REPO_ROOT / "gateway" / "servers" / "static"
        for asset in sorted(static.iterdir()):  # the dashboard's page, script and style
            assert wheel.read(f"gateway/servers/static/{asset.name}") == asset.read_bytes()
    assert {"gateway/py.typed", "inventory/py.typed", "gateway/stages/__init__.py"} <= names
    assert {"sqlshelf/__init__.py", "sqlshelf/py.typed"} <= names
    # the compose handlers routes.yaml names, and the shop example with its routes
    assert {"examples/home.py", "examples/shop/handlers.py", "examples/shop/routes.yaml"} <= names
    assert not [name for name in names if name.endswith(".pyc") or name.startswith("tests/")]


def test_the_installed_packages_come_from_the_new_venv_not_the_source_tree(
    installed: Installed,
) -> None:
    code = (
        "import json, gateway, gateway.stages, inventory, gateway.config.validate as v, "
        "inventory.schema as s; print(json.dumps([gateway.__file__, gateway.stages.__file__, "
        "inventory.__file__, str(v.SCHEMA_PATH), str(s.DEVICE_SCHEMA_PATH)]))"
    )
    python = installed.script("python")
    out = _run(python, "-c", code, cwd=installed.elsewhere, env=installed.env())
    for file in json.loads(out):
        assert installed.venv in Path(file).parents, file
        assert REPO_ROOT not in Path(file).resolve().parents, file


def test_a_source_checkout_reads_the_top_level_schemas() -> None:
    """The editable install (`make`) and `python -m` from the repository: no copies."""
    assert Path(str(SCHEMA_PATH)) == REPO_ROOT / "schemas" / "routes.schema.json"
    assert Path(str(DEVICE_SCHEMA_PATH)) == REPO_ROOT / "schemas" / "device.schema.json"


def test_gateway_check_passes_from_outside_the_repository(installed: Installed) -> None:
    args = (installed.script("gateway"), "--check", "--config", "routes.yaml")
    done = subprocess.run(
        args, cwd=installed.elsewhere, env=installed.env(), capture_output=True, text=True,
        timeout=START_SECONDS,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


async def _spawn(
    installed: Installed, log: Path, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Run one of the installed console scripts in the directory outside the repository."""
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            installed.script(args[0]), *args[1:],
            cwd=installed.elsewhere, env={**installed.env(), **(env or {})},
            stdout=sink, stderr=sink,
        )  # fmt: skip


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """The processes a test started; any still running at the end is killed."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_installed_gateway_serves_the_installed_inventory_from_outside_the_repository(
    installed: Installed, processes: list[asyncio.subprocess.Process]
) -> None:
    inventory_port, public, admin = free_port(), free_port(), free_port()
    here = installed.elsewhere
    async with aiohttp.ClientSession() as session:

        async def status(url: str) -> int:
            for process in processes:
                assert process.returncode is None, _logs(here)
            try:
                async with session.get(url) as resp:
                    return resp.status
            except aiohttp.ClientError:
                return 0  # not listening yet

        async def start(url: str, *args: str, env: dict[str, str] | None = None) -> None:
            processes.append(await _spawn(installed, here / f"{args[0]}.log", *args, env=env))
            code = await poll_until(lambda: status(url), lambda s: s == 200, within=START_SECONDS)
            assert code == 200, _logs(here)

        inventory_at = f"127.0.0.1:{inventory_port}"
        inventory_url = f"http://{inventory_at}"
        db = str(here / "inventory.db")
        await start(f"{inventory_url}/healthz", "inventory", "--db", db, "--listen", inventory_at)
        await start(
            f"http://127.0.0.1:{admin}/readyz",
            "gateway", "--config", "routes.yaml",
            "--listen", f"127.0.0.1:{public}", "--admin", f"127.0.0.1:{admin}",
            env={"INVENTORY_URL": inventory_url},  # routes.yaml reads it
        )  # fmt: skip
        async with session.get(f"http://127.0.0.1:{admin}/") as resp:  # the dashboard
            assert resp.status == 200
            assert "/static/dashboard.js" in await resp.text()
        devices = f"http://127.0.0.1:{public}/api/inventory/devices"
        device = {"name": "Hall light", "type": "light", "room": "hall"}
        key = {"X-API-Key": "dev-inventory-key"}  # routes.yaml's development key (README)
        async with session.post(devices, json=device, headers=key) as resp:
            assert resp.status == 201, await resp.text()
            created = await resp.json()
        async with session.get(f"{devices}/{created['id']}", headers=key) as resp:
            assert resp.status == 200, await resp.text()
            fetched = await resp.json()
    assert fetched["name"] == "Hall light"
    assert fetched == created

    inventory, gateway = processes
    for process in (gateway, inventory):
        process.send_signal(signal.SIGTERM)
    codes = [await asyncio.wait_for(p.wait(), STOP_SECONDS) for p in (gateway, inventory)]
    assert codes == [0, 0], _logs(here)


def _logs(here: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in sorted(here.glob("*.log")))
