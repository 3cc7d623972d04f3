"""The packages' import graphs: no cycle inside `precompute` or `app`, and `precompute` never imports upward.

Every module's AST is read (nothing is imported), so function-level and ``TYPE_CHECKING`` imports count too: an
import hidden in a function is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` (and every other absolute name) that a module's file imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: resolve against the module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports the module, else the package
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return targets


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    files = {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}
    modules = set(files)
    return {name: imported(path, modules) & modules - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as the list of its modules (first one repeated at the end), or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.mark.parametrize("package", ["precompute", "app"])
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert len(graph) > 5, f"no modules found under {package}/"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle or [])}"


def test_precompute_never_imports_app_or_cli():
    files = sorted((ROOT / "precompute").rglob("*.py"))
    upward = {
        module_name(path): sorted(t for t in imported(path, set()) if t.split(".")[0] in {"app", "cli"})
        for path in files
    }
    assert {name: targets for name, targets in upward.items() if targets} == {}
