"""The compiled build (proxy.native): tests/run's second pass really runs it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from proxy import native


def test_every_listed_module_has_its_source() -> None:
    for module in native.MODULES:
        assert native.source(module).is_file(), module
    assert len(set(native.MODULES)) == len(native.MODULES)


@pytest.mark.skipif(not os.environ.get("CALLGATE_NATIVE"), reason="the interpreted pass")
def test_the_compiled_pass_runs_every_listed_module_compiled() -> None:
    assert native.compiled() == list(native.MODULES)


def test_no_compiled_module_awaits_in_a_finally_block() -> None:
    """mypyc (2.4) miscompiles an await inside `finally:`: when the coroutine runs while its
    caller handles an exception, the finally block re-raises that exception, even after a
    clean exit. The compiled modules use `except BaseException: ...; raise` plus the same
    code after the try instead."""
    found = []
    for module in native.MODULES:
        tree = ast.parse(native.source(module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try | ast.TryStar):
                awaits = [
                    sub.lineno
                    for statement in node.finalbody
                    for sub in ast.walk(statement)
                    if isinstance(sub, ast.Await | ast.AsyncWith | ast.AsyncFor)
                ]
                found += [f"{module}:{line}" for line in awaits]
    assert found == []


def test_no_compiled_class_aliases_a_method() -> None:
    """mypyc (2.4) miscompiles `close = release` in a class body: every new instance left a
    KeyError set, which the next C call then reported as a SystemError. A compiled class
    defines the second name as a method that calls the first."""
    found = []
    for module in native.MODULES:
        tree = ast.parse(native.source(module).read_text())
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            methods = {
                node.name
                for node in cls.body
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            for node in cls.body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                    if node.value.id in methods:
                        found.append(f"{module}:{node.lineno}")
    assert found == []


@pytest.mark.skipif(not os.environ.get("CALLGATE_NATIVE"), reason="the interpreted pass")
def test_the_compiled_build_was_made_from_this_source() -> None:
    """A build left over from an older checkout must not pass for this one: the compiled pass
    fails unless every source file of the build's package copy (the compiled modules' and
    the interpreted rest) is the working tree's."""
    tree = Path(__file__).resolve().parent.parent
    assert native.ROOT != tree  # the pass imports the build, not the tree
    built = {p.relative_to(native.ROOT) for p in (native.ROOT / "proxy").rglob("*.py")}
    source = {p.relative_to(tree) for p in (tree / "proxy").rglob("*.py")}
    assert built == source
    stale = [
        str(p) for p in sorted(source) if (native.ROOT / p).read_bytes() != (tree / p).read_bytes()
    ]
    assert stale == []
