"""Build hook: put the top-level `schemas/` inside the built packages.

`schemas/` at the repository top is the one source of truth, and nothing is committed twice.
At build time (`pip install .`, `pip wheel .`, `python -m build`) each of its files is copied
into `gateway/_schemas/` and `inventory/_schemas/` of the build tree only, so the wheel
carries them and the installed programs run from any directory. The source tree is never
written to. MANIFEST.in puts `schemas/` in the sdist, so a wheel built from it has them too.

An editable install (`pip install -e .`, what `make` does) copies nothing: the packages are
the source directories, and both programs fall back to reading the top-level `schemas/` (see
`schema_file` in gateway/validate.py and inventory/schema.py). The rest of the build is in
pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# A top-level directory -> the directories inside the built packages that get its files.
# Shipping another top-level directory in the wheel is one more line (and one in MANIFEST.in).
COPIES = {
    "schemas": ("gateway/_schemas", "inventory/_schemas"),
}


class build_py_with_schemas(build_py):  # noqa: N801 - named like the command it extends
    def run(self) -> None:
        super().run()
        for source, target in self._copies():
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        copies = [str(target) for _, target in self._copies()]
        return [*super().get_outputs(include_bytecode), *copies]

    def _copies(self) -> list[tuple[Path, Path]]:
        if self.editable_mode:
            return []
        pairs = []
        for directory, targets in COPIES.items():
            sources = sorted(p for p in (ROOT / directory).rglob("*") if p.is_file())
            if not sources:  # e.g. an sdist made without them: fail, never ship a broken wheel
                raise FileNotFoundError(f"nothing to copy in {ROOT / directory}")
            for target in targets:
                for source in sources:
                    relative = source.relative_to(ROOT / directory)
                    pairs.append((source, Path(self.build_lib, target, relative)))
        return pairs


setup(cmdclass={"build_py": build_py_with_schemas})
