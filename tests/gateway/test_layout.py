"""The package layout is the architecture (STYLE §2): each layer imports only the layers below
it (or modules of its own package), and no runtime import cycle exists anywhere. Type-only
imports under `if TYPE_CHECKING:` do not count: they never run."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

import gateway

PACKAGE: Final = Path(gateway.__file__).resolve().parent
# Low to high. A module may import its own package and any package of a lower rank.
RANKS: Final = {
    "config": 0,
    "http": 1,
    "upstream": 2,
    "ratelimit": 2,  # rate-limit stores: memory, Redis
    "cache": 2,  # response cache: RFC 9111 policy, shared store, coalescing, invalidation
    "auth": 3,  # credentials to identities (forward auth sends through upstream/)
    "stages": 4,
    "actions": 4,
    "ops": 4,
    "runtime": 5,
    "servers": 6,
    "": 7,  # the process: __main__, server, explain
}
TOP_LEVEL_LIMIT: Final = 5  # modules left directly in gateway/, __init__ included


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SUBPACKAGES: Final = frozenset(
    p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
)


def package_of(module: str) -> str:
    """'gateway.http.errors' -> 'http'; a module directly in gateway/ -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in SUBPACKAGES else ""


def runtime_imports(path: Path) -> set[str]:
    """The gateway modules `path` imports when it runs (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "gateway":
                    found.update(f"gateway.{alias.name}" for alias in child.names)
                elif child.module.startswith("gateway."):
                    found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("gateway."))
            visit(child)

    visit(tree)
    return found


def modules() -> dict[str, set[str]]:
    graph = {module_name(p): runtime_imports(p) for p in PACKAGE.rglob("*.py")}
    known = set(graph)
    return {m: {i for i in imports if i in known and i != m} for m, imports in graph.items()}


def test_every_package_has_a_rank() -> None:
    packages = {package_of(m) for m in modules()}
    assert packages <= set(RANKS), packages - set(RANKS)


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, imports in modules().items():
        mine = package_of(module)
        for imported in imports:
            theirs = package_of(imported)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_runtime_import_cycle() -> None:
    graph = modules()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not cycles, cycles


def test_only_a_handful_of_modules_stay_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, top
