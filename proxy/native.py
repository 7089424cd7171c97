"""The modules callgate can run compiled, and whether this process runs them so.

The request path is plain typed Python. mypyc (part of mypy, which already checks these
modules in strict mode) compiles the same source into C extension modules: attribute access,
calls between the compiled modules and the protocol code's loops run without the interpreter.
Nothing here is a second implementation: the source is the reference, and `tests/run` runs the
whole suite against both builds.

    python -m proxy.native build DIR   # a compiled copy of the package in DIR (PYTHONPATH=DIR)
    python -m proxy.native status      # which modules this interpreter loads compiled

`setup.py` compiles the same list into a wheel when CALLGATE_COMPILE=1 (the container image).

This module is loaded by `setup.py` on its own (not as part of the package): it imports only
the standard library at the top.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# The hot path's modules (profiles of the benchmark: the stream gate, the decision pipeline,
# the store's batches, the forwarding). Left out, and why:
# - proxy.http1_base: its errors derive from asyncio.TimeoutError (a builtin type).
# - proxy.http_guard: its handler subclasses aiohttp's RequestHandler, which has __slots__
#   (a compiled class cannot: TypeError at import).
# - proxy.audit.records: `_Raw` subclasses str.
# - proxy.delivery, toolcalls, transport, paths, gates.budget/ratelimit/schema/allow and
#   audit.writer compile and pass the suite, but showed no gain beyond the benchmark's noise:
#   left out rather than adding build time for nothing measured.
# - proxy.audit.chain: compiled, `view = view[os.write(fd, view):]` over a memoryview wrote
#   the bytes twice (tests/test_audit.py caught it); it runs once per audit file opened.
# - proxy.logs: its logging.Handler subclass, compiled, crashed the interpreter in the garbage
#   collector (tests/test_logs.py under the compiled pass).
# Two miscompiles the compiled source avoids, each pinned by a test in tests/test_native.py:
# an await inside `finally:`, and a class attribute naming a method (`close = release`).
# A class of these that interpreted code subclasses carries
# @mypyc_attr(allow_interpreted_subclasses=True) (e.g. stream_effects.GateSteps).
MODULES: tuple[str, ...] = (
    "proxy.sse",
    "proxy.chat_gate",
    "proxy.chat_pieces",
    "proxy.chat_held",
    "proxy.chat_finish",
    "proxy.stream_effects",
    "proxy.stream_loop",
    "proxy.forward",
    "proxy.http1",
    "proxy.app",
    "proxy.upstream",
    "proxy.http_answer",
    "proxy.stream_response",
    "proxy.routes.incoming",
    "proxy.routes.chat",
    "proxy.audit",
    "proxy.metrics",
    "proxy.timestamps",
    "proxy.principal",
    "proxy.rounds",
    "proxy.request_shape",
    "proxy.gates.pipeline",
    "proxy.gates.arguments",
    "proxy.gates.rules",
    "proxy.gates.decision",
    "proxy.store.redis",
    "proxy.store.redis_batch",
    "proxy.store.resp",
)

ROOT = Path(__file__).resolve().parent.parent  # the directory that holds the package


def source(module: str, root: Path = ROOT) -> Path:
    """The file a module is compiled from (a package's is its __init__.py)."""
    path = root.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def compiled() -> list[str]:
    """The modules of MODULES this interpreter loaded from an extension module."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [m for m in MODULES if str(importlib.import_module(m).__file__).endswith(suffixes)]


def build(target: Path) -> Path:
    """Copy the package into `target` and compile MODULES there, in place.

    The copy keeps the interpreted source beside the extensions (as a wheel does), so
    `PYTHONPATH=target` runs the compiled build, and the working tree never holds an extension
    that would shadow a later edit of its source.
    """
    target = target.resolve()
    package = target / "proxy"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(
        ROOT / "proxy", package, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd")
    )
    # mypyc reads the type checker's settings (e.g. re2's missing hints) from here.
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")
    for stale in target.glob("*__mypyc*"):
        stale.unlink()
    script = (
        "from setuptools import setup; from proxy.native import extensions\n"
        "setup(name='callgate-native', script_args=['build_ext', '--inplace', '-q'],\n"
        "      ext_modules=extensions())\n"
    )
    # `-c` puts the working directory first on sys.path: the copy's proxy.native is imported.
    subprocess.run([sys.executable, "-c", script], cwd=target, check=True)
    return target


def extensions() -> list[Any]:
    """MODULES as setuptools extension modules, compiled by mypyc: what `setup.py` (with
    CALLGATE_COMPILE=1) and `build` both build. The working directory is the one that holds
    `proxy/`, and mypy (the [native] extra) must be installed."""
    from mypyc.build import mypycify

    return list(mypycify([str(source(m, Path())) for m in MODULES], opt_level="3"))


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"] and len(argv) == 2:
        print(build(Path(argv[1])))
        return 0
    if argv == ["status"]:
        done = compiled()
        print(f"{len(done)} of {len(MODULES)} modules compiled")
        for module in MODULES:
            print(("compiled " if module in done else "source   ") + module)
        return 0
    print("usage: python -m proxy.native build DIR | status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
