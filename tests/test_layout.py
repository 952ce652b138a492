"""The package's layout rules, read from the source: no import cycle, and arrows that point down.

Imports inside functions count: moving an import into a function hides a cycle from Python's
import machinery, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scheduler"

# Which parts of the package each layer may import (besides the flat leaf modules below).
# A layer's own modules are always allowed; anything not listed is an upward arrow.
LEAVES = {
    "scheduler",
    "scheduler.errors",
    "scheduler.clock",
    "scheduler.outcomes",
    "scheduler.timing.cron",  # a leaf: config checks cron expressions with it
}
LAYERS: dict[str, set[str]] = {
    "scheduler.config": set(),
    "scheduler.timing": {"scheduler.config"},
    "scheduler.store": {"scheduler.config", "scheduler.timing"},
    "scheduler.api": {"scheduler.config", "scheduler.logs"},
    "scheduler.logs": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every te-scheduler module ``path`` imports, at any depth of its code."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scheduler"):
                    yield _nearest(alias.name, known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("scheduler"):
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                yield candidate if candidate in known else _nearest(node.module, known)


def _nearest(name: str, known: dict[str, Path]) -> str:
    while name not in known:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    known = all_modules()
    return {
        name: {m for m in imported_modules(path, known) if m != name}
        for name, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer_of(module: str) -> str | None:
    return next(
        (layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None
    )


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_only_what_lies_below_it(layer: str) -> None:
    allowed = LAYERS[layer] | LEAVES | {layer}
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if layer_of(module) == layer
        for target in targets
        if target not in LEAVES and layer_of(target) not in allowed
    )
    assert upward == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above is only as good as this: a graph with a cycle must be caught.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
