"""The package's import graph: no cycles, and no module imports a stage above its own (the folders
read as the pipeline, docs/architecture.md). Every import counts, inside functions and under
TYPE_CHECKING too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resrank_export"
# Lowest first; a module may import its own layer and those below it.
LAYERS = (
    ("resrank_export", "resrank_export.errors", "resrank_export.lazy", "resrank_export.fs", "resrank_export.progress",
     "resrank_export.interrupt", "resrank_export.runtime", "resrank_export.manifest"),
    ("resrank_export.data",),
    ("resrank_export.model",),
    ("resrank_export.export",),
    ("resrank_export.precision",),
    ("resrank_export.engine",),
    ("resrank_export.index",),
    ("resrank_export.triton",),
    ("resrank_export.build",),
    ("resrank_export.bench",),
    ("resrank_export.cli", "resrank_export.config_file", "resrank_export.__main__"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in the file (`from x import name` counts x, or x.name when
    that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")
    return best[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_stage_above_its_own():
    upward = [f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
              for src, targets in import_graph().items() for dst in sorted(targets) if layer_of(dst) > layer_of(src)]
    assert not upward, "\n".join(upward)


def test_the_checks_find_what_they_look_for():
    """The walkers on known graphs: a cycle through three modules, and an upward edge."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer_of("resrank_export.index.stage") > layer_of("resrank_export.model.checkpoint")
    graph = import_graph()
    assert "resrank_export.model.checkpoint" in graph["resrank_export.model.reference"]
    # a function-level import is seen too (build.py imports the demo checkpoint inside run_build)
    assert "resrank_export.model.demo" in graph["resrank_export.build"]
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("somewhere_else.module")
