"""Which build of the package this pass runs (tests/run runs the suite twice; proxy/native.py)."""

from __future__ import annotations

import os

import pytest

COMPILED = bool(os.environ.get("CALLGATE_NATIVE"))

# A test that spies on internals by patching a function or a method cannot see the calls made
# inside compiled modules: those are bound when compiled. Such a test runs in the interpreted
# pass; the compiled pass runs the same source under every behavioural test around it.
spies_on_internals = pytest.mark.skipif(
    COMPILED, reason="patches a compiled module's internals: runs in the interpreted pass"
)
