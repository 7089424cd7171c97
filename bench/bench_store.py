"""Store benchmark: `reserve` (one tool call's rate-limit slot + budget charge) on memory vs Redis.

    python -m bench.bench_store [--count 5000] [--concurrency 32] [--redis-url URL]

Without --redis-url it starts its own `redis-server` on a free loopback port (no persistence)
and stops it afterwards. Prints, per backend: sequential latency per decision (mean/p50/p99) and
throughput with `--concurrency` decisions in flight, then the Redis/memory ratios. Every run is
bounded by --count decisions per phase and --max-seconds per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from proxy.store import ChargeRequest, SlotRequest, Store
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore

PRINCIPALS = 100


def items(i: int) -> list[SlotRequest | ChargeRequest]:
    """A typical gated call: a rate limit and a budget charge, for one of 100 principals."""
    who = i % PRINCIPALS
    return [
        SlotRequest(f"rl:tools:search@p{who}", 1_000_000, 3600.0, 0.0),
        ChargeRequest(f"budget:search@p{who}", 10**12, 3600.0, 10_000),
    ]


async def sequential(store: Store, count: int, max_seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(count):
        t0 = time.perf_counter()
        r = await store.reserve(items(i))
        latencies.append(time.perf_counter() - t0)
        assert r.token, "every benchmark call should pass"
        if t0 > deadline:
            break
    return latencies


async def concurrent(store: Store, count: int, workers: int, max_seconds: float) -> float:
    """Decisions per second with `workers` reservations in flight."""
    next_i = 0
    done = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < count and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            await store.reserve(items(i))
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / (time.perf_counter() - started)


async def ping_latency(url: str, count: int) -> float:
    store = RedisStore(url, timeout=2.0)
    try:
        for _ in range(100):
            await store.ping()
        t0 = time.perf_counter()
        for _ in range(count):
            await store.ping()
        return (time.perf_counter() - t0) / count * 1e6
    finally:
        await store.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(name: str, make: Callable[[], Store], args: argparse.Namespace) -> dict[str, float]:
    store = make()
    try:
        await sequential(store, min(200, args.count), args.max_seconds)  # warm up
        lat = await sequential(store, args.count, args.max_seconds)
        rate = await concurrent(store, args.count, args.concurrency, args.max_seconds)
    finally:
        await store.close()
    us = [x * 1e6 for x in lat]
    result = {
        "mean": statistics.fmean(us),
        "p50": pct(us, 0.50),
        "p99": pct(us, 0.99),
        "seq_rate": len(lat) / sum(lat),
        "rate": rate,
    }
    print(
        f"{name:<7} latency/decision mean {result['mean']:8.1f} us  p50 {result['p50']:8.1f} us"
        f"  p99 {result['p99']:8.1f} us   sequential {result['seq_rate']:9.0f}/s"
        f"   concurrent({args.concurrency}) {result['rate']:9.0f}/s"
    )
    return result


def start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit(
            "redis-server not found (Debian package redis-server), or pass --redis-url"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="callgate-bench-redis-")
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*cmd, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 5
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("redis-server did not start")
        time.sleep(0.01)
    return proc, f"redis://127.0.0.1:{port}/0", workdir


async def main_async(args: argparse.Namespace, url: str) -> None:
    print(
        f"reserve(): rate-limit slot + budget charge, {PRINCIPALS} principals, "
        f"{args.count} decisions per phase"
    )
    mem = await run("memory", MemoryStore, args)
    prefix = f"bench{time.time_ns()}:"
    red = await run("redis", lambda: RedisStore(url, timeout=2.0, prefix=prefix), args)
    ping = await ping_latency(url, args.count)
    print(f"redis PING round trip through redis-py (the floor): mean {ping:.1f} us")
    print(
        f"redis/memory: latency x{red['mean'] / mem['mean']:.1f} "
        f"(+{red['mean'] - mem['mean']:.1f} us per decision, "
        f"+{red['p99'] - mem['p99']:.1f} us at p99); "
        f"throughput x{red['rate'] / mem['rate']:.3f} ({red['rate']:.0f}/s vs {mem['rate']:.0f}/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    if args.redis_url:
        asyncio.run(main_async(args, args.redis_url))
        return
    proc, url, workdir = start_redis()
    try:
        asyncio.run(main_async(args, url))
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
