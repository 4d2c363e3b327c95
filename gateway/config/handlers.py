"""Compose handlers by name: `package.module:function`, imported when a config is loaded.

The directory holding the config file goes first on `sys.path`, so handlers can live next to
routes.yaml; an installed package (the shipped `examples`) is found as any import is. A bad
name, an import that fails, or something that is not an async function is a problem string
for validation to report at the key (`FILE:LINE:COL`).

Reload: a loaded module whose source file changed since it was imported is imported again
(`importlib.reload`), so editing a handler and saving routes.yaml (or SIGHUP) brings it in.
Only the handler's own module is re-imported, not modules it imports; and since `reload`
re-runs the module in the same namespace, requests already inside the old function see the
new module's globals. A module that fails to re-import keeps the old table serving.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Final

HandlerFunction = Callable[..., Awaitable[object]]

_lock: Final = threading.Lock()  # loads run on a thread (reload) and on the loop (startup)
_stamps: dict[str, tuple[int, int]] = {}  # module name -> (mtime_ns, size) when imported


def put_first_on_path(config_file: str) -> None:
    """The config file's directory at the front of sys.path (once)."""
    if config_file.startswith("<"):  # text given in memory: no directory
        return
    directory = str(Path(config_file).resolve().parent)
    if not sys.path or sys.path[0] != directory:
        if directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)


def load_handler(spec: str, config_file: str) -> tuple[HandlerFunction | None, str | None]:
    """(the function, None) or (None, why not). Never raises for the handler's faults."""
    module_name, _, attribute = spec.partition(":")
    with _lock:
        put_first_on_path(config_file)
        try:
            module = _import(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module_name
            return None, f"cannot import {module_name!r}: no module named {missing!r}"
        except Exception as exc:  # the handler's own module failed while importing
            return None, f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
    function = getattr(module, attribute, None)
    if function is None:
        return None, f"module {module_name!r} has no attribute {attribute!r}"
    if not inspect.iscoroutinefunction(function):
        return None, f"{spec} must be an async function (async def {attribute}(ctx, request))"
    return function, None


def _import(name: str) -> ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = importlib.import_module(name)
    elif _changed(module):
        module = importlib.reload(module)
    _stamps[name] = _stamp(module) or (0, 0)
    return module


def _changed(module: ModuleType) -> bool:
    stamp = _stamp(module)
    known = _stamps.get(module.__name__)
    if known is None:  # imported by someone else first: take it as it is
        return False
    return stamp is not None and stamp != known


def _stamp(module: ModuleType) -> tuple[int, int] | None:
    source = getattr(module, "__file__", None)
    if not source:
        return None
    try:
        info = os.stat(source)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size
