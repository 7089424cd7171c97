"""Builds callgate; with CALLGATE_COMPILE=1 its hot-path modules are compiled with mypyc.

setuptools takes extension modules only from here (pyproject.toml has the rest). The list of
modules and why it is what it is: proxy/native.py. A compiled build needs the dependencies and
mypy installed first (`pip install --no-build-isolation`): mypyc type-checks against them.
"""

import importlib.util
import os

from setuptools import setup

ext_modules = []
if os.environ.get("CALLGATE_COMPILE") == "1":
    spec = importlib.util.spec_from_file_location("callgate_native", "proxy/native.py")
    assert spec is not None and spec.loader is not None
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    ext_modules = native.extensions()

setup(ext_modules=ext_modules)
