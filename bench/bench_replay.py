"""Replay benchmark: how fast `callgate replay` re-decides an audit file.

    python -m bench.bench_replay [--records 1000000] [--dir DIR] [--keep]

Writes a synthetic audit file shaped like callgate's (the fields Auditor.record writes, a
`prev`/`hash` pair, realistic arguments; 200 principals, four tools, ten calls a second of
recorded time), decided under the default-like policy below, then replays it under a stricter
policy and prints records/s and the report's counts. --records is capped at 5 million (the file
costs about 450 bytes a record).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import orjson

from proxy.policy import load_policy_text
from proxy.replay import replay
from proxy.timestamps import utc_iso

MAX_RECORDS = 5_000_000
STRICTER = """
default: {allow: false}
budgets:
  search: {max_spend: "0.50", window: 3600}
tools:
  get_weather:
    rate_limit: {max_calls: 5, window: 60}
  search_web:
    budget: {ledger: search, cost: "0.01"}
    rules:
      - name: no_pii
        deny_if: 'args.query.lowerAscii().contains("ssn")'
      - name: short
        deny_if: 'size(args.query) > 40'
    arguments_schema: {type: object, required: [query]}
  read_file:
    rules:
      - {name: no_etc, deny_if: 'args.path.startsWith("/etc/")'}
"""
TOOLS = ("get_weather", "search_web", "read_file", "send_email")
QUERIES = ("weather in Paris", "ssn of my neighbour", "a quite long query about benchmark numbers")


def synth(path: str, n: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    start = 1_750_000_000.0
    with open(path, "wb") as fh:
        buf = []
        for i in range(n):
            tool = TOOLS[i % 4]
            if tool == "get_weather":
                args: object = {"city": rng.choice(("Paris", "Oslo", "Lima")), "units": "metric"}
            elif tool == "search_web":
                args = {"query": rng.choice(QUERIES), "max_results": 5}
            elif tool == "read_file":
                args = {"path": rng.choice(("/tmp/a.txt", "/etc/passwd", "/home/u/notes.md"))}
            else:
                args = {"to": "bob@example.com", "body": "[REDACTED]"}
            blocked = rng.random() < 0.05
            record = {
                "time": utc_iso(start + i * 0.1),
                "request_id": f"req_{i // 2:08d}",
                "route": "chat",
                "principal": f"user{rng.randrange(200)}",
                "tool": tool,
                "policy": tool,
                "call_id": f"call_{i:09d}",
                "decision": "blocked" if blocked else "allowed",
                "gate": "rules" if blocked else None,
                "reason": "rule" if blocked else None,
                "message": "Policy violation: no_pii" if blocked else None,
                "action": "reprompt" if blocked else None,
                "shadow": [],
                "fail_open": [],
                "arguments": args,
                "latency_ms": 0.021,
                "prev": "0" * 64,
                "hash": "f" * 64,
            }
            buf.append(orjson.dumps(record))
            if len(buf) >= 10_000:
                fh.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            fh.write(b"\n".join(buf) + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args()
    n = max(1, min(opts.records, MAX_RECORDS))
    fd, path = tempfile.mkstemp(prefix="replay-bench-", suffix=".jsonl", dir=opts.dir)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        synth(path, n)
        made = time.perf_counter() - t0
        size = os.path.getsize(path)
        print(f"synthetic audit file: {n} records, {size / 1e6:.0f} MB, written in {made:.1f}s")
        policy = load_policy_text(STRICTER, "<stricter>")
        report = replay(policy, [path])
        summary = report.as_json()
        rate = n / report.seconds
        print(
            f"replay: {n} records in {report.seconds:.2f}s on one core = {rate:,.0f} records/s "
            f"({report.seconds / n * 1e6:.1f} us/record)"
        )
        print(
            "  "
            + ", ".join(
                f"{k} {summary[k]}"
                for k in ("unchanged", "allowed_to_blocked", "blocked_to_allowed", "undecidable")
            )
        )
    finally:
        if not opts.keep:
            os.unlink(path)


if __name__ == "__main__":
    main()
