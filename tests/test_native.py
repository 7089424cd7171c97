"""The compiled build (proxy.native): tests/run's second pass really runs it."""

from __future__ import annotations

import os

import pytest

from proxy import native


def test_every_listed_module_has_its_source() -> None:
    for module in native.MODULES:
        assert native.source(module).is_file(), module
    assert len(set(native.MODULES)) == len(native.MODULES)


@pytest.mark.skipif(not os.environ.get("CALLGATE_NATIVE"), reason="the interpreted pass")
def test_the_compiled_pass_runs_every_listed_module_compiled() -> None:
    assert native.compiled() == list(native.MODULES)
