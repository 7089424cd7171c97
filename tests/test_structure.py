"""The shape the code keeps (issue "Settle a round once"): short modules, no import cycle, no
function harder to follow than radon's grade C. A change that breaks one says so here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PROXY.rglob("*.py")):
        name = ".".join(path.relative_to(PROXY.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def test_no_module_over_600_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: lines for n, lines in long.items() if lines > MAX_LINES} == {}


def imports_at_load(path: Path, known: dict[str, Path]) -> set[str]:
    """The proxy modules a module imports when it is loaded (module level, outside
    `if TYPE_CHECKING:`); `from package import submodule` counts as the submodule."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known.keys()
            if subs:
                out |= subs
            if node.module in known and len(subs) < len(node.names):
                out.add(node.module)
    return out


def test_no_import_cycle():
    known = modules()
    graph = {name: imports_at_load(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*trail[trail.index(dep) :], dep] if dep in trail else [name, dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_function_worse_than_grade_c():
    radon = pytest.importorskip("radon.complexity")
    worse = []
    for name, path in modules().items():
        for block in radon.cc_visit(path.read_text()):
            if radon.cc_rank(block.complexity) > "C":
                worse.append(f"{name}:{block.lineno} {block.name} ({block.complexity})")
    assert worse == []
