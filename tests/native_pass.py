"""Which build of the package this pass runs (tests/run runs the suite twice; proxy/native.py)."""

from __future__ import annotations

import os
import sys

import pytest

COMPILED = bool(os.environ.get("CALLGATE_NATIVE"))

# A test that spies on internals by patching a function or a method cannot see the calls made
# inside compiled modules: those are bound when compiled. Such a test runs in the interpreted
# pass; the compiled pass runs the same source under every behavioural test around it.
spies_on_internals = pytest.mark.skipif(
    COMPILED, reason="patches a compiled module's internals: runs in the interpreted pass"
)


def proxy_cli() -> list[str]:
    """The command that runs callgate's CLI in a subprocess test, from the build this pass
    tests. (`-m proxy` from the source tree would import the source in both passes: `-m` puts
    the working directory before PYTHONPATH.)"""
    native = os.environ.get("CALLGATE_NATIVE")
    if not native:
        return [sys.executable, "-m", "proxy"]
    code = f"import sys; sys.path.insert(0, {native!r}); from proxy.cli import main; "
    return [sys.executable, "-c", code + "raise SystemExit(main())"]
