"""bench/run.py end to end, tiny and bounded: it starts the mock upstream, the bare proxy and
callgate, measures every mode, and prints the table. No speed is asserted, only that each
measurement completed requests without errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(module: str, *args: str) -> str:
    """A benchmark module's output, run as `python -m bench.<module>` (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_benchmark_quick_run_completes_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--duration",
            "0.3",
            "--warmup",
            "0.1",
            "--concurrency",
            "8",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    assert "req/s" in proc.stdout and "p99 ms" in proc.stdout
    assert "callgate/bare throughput, non-streaming" in proc.stdout
    assert "added p50 at concurrency 1, non-streaming" in proc.stdout
    assert "chain intact" in proc.stdout  # the audit file written under load verifies

    data = json.loads(out.read_text())
    seen = {(r["mode"], r["target"], r["concurrency"]) for r in data["results"]}
    assert seen == {
        (mode, target, conc)
        for mode in ("non-streaming", "streaming")
        for target in ("direct", "bare", "callgate")
        for conc in (8, 1)
    }
    for r in data["results"]:
        label = f"{r['mode']} {r['target']} c={r['concurrency']}"
        assert r["requests"] > 0, label
        assert r["errors"] == 0, f"{label}: {r['error_kinds']}"
    for r in data["results"]:
        if r["target"] != "direct":  # the proxies' memory is read from /proc after each run
            assert r["rss_mb"] > 1 and r["peak_rss_mb"] >= r["rss_mb"], r
    assert "peak resident memory, callgate / bare" in proc.stdout


def test_auth_benchmark_prints_each_mode():
    out = _bench("bench_auth", "--requests", "200")
    for mode in ("keys", "jwt (cached per token)", "jwt-first", "trusted_header"):
        line = next(x for x in out.splitlines() if x.strip().startswith(mode))
        assert float(line.split()[-2]) > 0


def test_redis_clients_benchmark_measures_each_client():
    out = _bench("bench_redis_clients", "--count", "100")
    for client in ("redis-py", "slim"):
        line = next(x for x in out.splitlines() if x.startswith(client))
        figures = [float(f) for f in re.findall(r"([0-9.]+) µs", line)]
        assert len(figures) == 2 and all(f > 0 for f in figures), line


def test_stream_gate_benchmark_prints_both_paths():
    out = _bench("bench_stream_gate", "--streams", "20", "--rounds", "1")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["40", "400", "4000"]
    for row in rows:
        assert float(row[2]) > 0 and float(row[4]) > 0, row
