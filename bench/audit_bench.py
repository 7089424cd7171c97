"""Audit file benchmark: what writing records before delivery costs, per `audit.fsync` setting.

    python -m bench.audit_bench [--seconds 1.0] [--waiters 1,16,64] [--dir DIR]

For each fsync setting (never, batch, always) and each number of concurrent waiters, that many
tasks loop `record()` + `await durable()` (a route about to deliver a call) for --seconds; it
prints records/s, the latency of durable() (p50/p99), and the writes and fdatasyncs it took.
The row `timer` is the path without durable(): records go out with the 20 ms batch. Then the
cost per write of keeping the file open (a stat() to notice rotation) against opening and
closing it each time. Each cell is bounded by --seconds and --max-records. Files go to --dir
(default: a temporary directory under the current one; fsync on tmpfs would measure nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from proxy.audit import Auditor
from proxy.config import AuditConfig
from proxy.gates.decision import Decision
from proxy.toolcalls import CallContext, ToolCall

ARGS = {"query": "latest benchmark results for reverse proxies", "max_results": 5}
CTX = CallContext(principal="bench", request_id="r", route="bench")


class SyncCounter:
    def __init__(self) -> None:
        self.calls = 0
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.real(fd)


async def cell(
    path: str, fsync: str, wait: bool, waiters: int, seconds: float, limit: int
) -> dict[str, Any]:
    counter = SyncCounter()
    os.fdatasync = counter  # type: ignore[assignment]  # counted, still synced
    try:
        auditor = Auditor(AuditConfig(log=False, file=path, fsync=fsync))  # type: ignore[arg-type]
        await auditor.start()
        latencies: list[float] = []
        count = 0
        deadline = time.perf_counter() + seconds

        async def client(k: int) -> None:
            nonlocal count
            i = 0
            while time.perf_counter() < deadline and count < limit:
                call = ToolCall(f"c{k}-{i}", "search_web", "{}")
                auditor.record(
                    Decision(call, "search_web", "strip", args=ARGS), CTX, "allowed", None
                )
                count += 1
                i += 1
                if wait:
                    t0 = time.perf_counter()
                    await auditor.durable()
                    latencies.append(time.perf_counter() - t0)
                else:
                    await asyncio.sleep(0)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(waiters)))
        elapsed = time.perf_counter() - start
        writer = auditor._writer
        writes = writer.writes if writer is not None else 0
        await auditor.close()
        return {
            "records_s": count / elapsed,
            "p50_us": statistics.median(latencies) * 1e6 if latencies else 0.0,
            "p99_us": statistics.quantiles(latencies, n=100)[98] * 1e6
            if len(latencies) > 1
            else 0.0,
            "writes": writes,
            "syncs": counter.calls,
            "records": count,
        }
    finally:
        os.fdatasync = counter.real


def reopen_cost(path: str, rounds: int = 20000) -> tuple[float, float]:
    """µs per write spent on the file itself: the stat() that notices rotation of the file
    kept open, against opening and closing it for each write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    t0 = time.perf_counter()
    for _ in range(rounds):
        os.stat(path)
    kept = (time.perf_counter() - t0) / rounds * 1e6
    os.close(fd)
    t0 = time.perf_counter()
    for _ in range(rounds):
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666))
    reopened = (time.perf_counter() - t0) / rounds * 1e6
    return kept, reopened


async def run(args: argparse.Namespace) -> None:
    base = tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir)
    try:
        print(f"audit file in {base} ({args.seconds:g} s per cell)")
        header = (
            f"{'fsync':<8}{'waiters':>8}{'records/s':>12}{'p50 us':>10}{'p99 us':>10}"
            f"{'writes':>9}{'syncs':>8}{'rec/write':>11}"
        )
        print(header)
        print("-" * len(header))
        for n, fsync in enumerate(("timer", "never", "batch", "always")):
            for waiters in args.waiters:
                path = os.path.join(base, f"audit-{n}-{waiters}.jsonl")
                mode, wait = ("never", False) if fsync == "timer" else (fsync, True)
                result = await cell(path, mode, wait, waiters, args.seconds, args.max_records)
                per_write = result["records"] / result["writes"] if result["writes"] else 0.0
                print(
                    f"{fsync:<8}{waiters:>8}{result['records_s']:>12,.0f}{result['p50_us']:>10,.0f}"
                    f"{result['p99_us']:>10,.0f}{result['writes']:>9}{result['syncs']:>8}"
                    f"{per_write:>11.1f}"
                )
        kept, reopened = reopen_cost(os.path.join(base, "reopen.jsonl"))
        print(f"\nper write: stat() of the open file {kept:.1f} us, open+close {reopened:.1f} us")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--max-records", type=int, default=200_000)
    parser.add_argument(
        "--waiters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64]
    )
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
