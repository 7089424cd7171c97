"""Store benchmark: `reserve` (one tool call's rate-limit slot + budget charge) on memory vs Redis.

    python -m bench.bench_store [--count 5000] [--concurrency 32] [--redis-url URL]

Without --redis-url it starts its own `redis-server` on a free loopback port (no persistence)
and stops it afterwards. Prints, per variant: sequential latency per decision (mean/p50/p99),
then with `--concurrency` decisions in flight: throughput, latency p50/p99 and this process's CPU
per decision (Redis's own CPU is not counted: it is another process; sequentially, one round
trip per decision, it is the client's CPU per round trip). Variants:

    memory        the in-process store
    redis 1/run   one script run (one EVALSHA round trip) per call: the store before pipelining
    redis         auto-pipelined: the calls of one loop iteration share a script run
    redis many8   reserve_many: a response's 8 calls in one round trip (per decision figures)
    redis-py ...  the same two first Redis runs through redis-py's asyncio client instead of
                  the slim client (proxy.store.resp): what the store uses when the URL has a
                  query string (here `?health_check_interval=0`, which changes nothing else)

Every run is bounded by --count decisions per phase and --max-seconds per phase. The parser in
use (hiredis when installed, else redis-py's pure-Python one) is printed first.
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
# A query string only redis-py reads: the store then sends everything through redis-py.
REDIS_PY = "?health_check_interval=0"


# Built once per principal, as the gates build a call's items once per tool and principal
# (proxy.gates.pipeline): the Redis store keeps what it makes of them per items.
_ITEMS: list[tuple[SlotRequest | ChargeRequest, ...]] = [
    (
        SlotRequest(f"rl:tools:search@p{who}", 1_000_000, 3600.0, 0.0),
        ChargeRequest(f"budget:search@p{who}", 10**12, 3600.0, 10_000),
    )
    for who in range(PRINCIPALS)
]


def items(i: int) -> tuple[SlotRequest | ChargeRequest, ...]:
    """A typical gated call: a rate limit and a budget charge, for one of 100 principals."""
    return _ITEMS[i % PRINCIPALS]


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


async def concurrent(
    store: Store, count: int, workers: int, max_seconds: float, per_response: int = 1
) -> tuple[float, list[float], float]:
    """(decisions per second, latencies, CPU seconds per decision) with `workers` requests in
    flight; each request reserves `per_response` calls (reserve_many when more than one)."""
    next_i = 0
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < count and time.perf_counter() < deadline:
            i = next_i
            next_i += per_response
            t0 = time.perf_counter()
            if per_response == 1:
                await store.reserve(items(i))
            else:
                await store.reserve_many([items(i + j) for j in range(per_response)])
            latencies.append(time.perf_counter() - t0)
            done += per_response

    cpu0 = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    return done / wall, latencies, cpu / max(1, done)


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


async def run(
    name: str, make: Callable[[], Store], args: argparse.Namespace, per_response: int = 1
) -> dict[str, float]:
    store = make()
    try:
        await store.start()
        await sequential(store, min(200, args.count), args.max_seconds)  # warm up
        cpu0 = time.process_time()
        lat = await sequential(store, args.count, args.max_seconds)
        seq_cpu = (time.process_time() - cpu0) / len(lat)
        rate, clat, cpu = await concurrent(
            store, args.count, args.concurrency, args.max_seconds, per_response
        )
    finally:
        await store.close()
    us = [x * 1e6 for x in lat]
    cus = [x * 1e6 for x in clat]
    result = {
        "mean": statistics.fmean(us),
        "p50": pct(us, 0.50),
        "p99": pct(us, 0.99),
        "seq_rate": len(lat) / sum(lat),
        "seq_cpu": seq_cpu * 1e6,
        "rate": rate,
        "c_p50": pct(cus, 0.50),
        "c_p99": pct(cus, 0.99),
        "cpu": cpu * 1e6,
    }
    print(
        f"{name:<12} seq mean {result['mean']:7.1f} us p50 {result['p50']:7.1f} us"
        f" p99 {result['p99']:7.1f} us cpu {result['seq_cpu']:5.1f} us"
        f" | c={args.concurrency}: {result['rate']:7.0f}/s"
        f" p50 {result['c_p50']:7.1f} us p99 {result['c_p99']:8.1f} us"
        f" cpu {result['cpu']:6.1f} us/decision"
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
    from redis.utils import HIREDIS_AVAILABLE

    print(
        f"reserve(): rate-limit slot + budget charge, {PRINCIPALS} principals, "
        f"{args.count} decisions per phase; redis-py parser: "
        f"{'hiredis' if HIREDIS_AVAILABLE else 'pure Python (pip install hiredis)'}"
    )
    mem = await run("memory", MemoryStore, args)

    def redis(query: str = "", **kw: int) -> Callable[[], Store]:
        prefix = f"bench{time.time_ns()}:"
        return lambda: RedisStore(url + query, timeout=2.0, prefix=prefix, **kw)

    one = await run("redis 1/run", redis(max_batch=1), args)
    red = await run("redis", redis(), args)
    many = await run("redis many8", redis(), args, per_response=8)
    py_one = await run("redis-py 1/run", redis(REDIS_PY, max_batch=1), args)
    py = await run("redis-py", redis(REDIS_PY), args)
    ping = await ping_latency(url, args.count)
    print(f"redis PING round trip through the slim client (the floor): mean {ping:.1f} us")
    print(
        f"slim client vs redis-py, CPU per decision: one run per call {py_one['cpu']:.1f} -> "
        f"{one['cpu']:.1f} us, pipelined {py['cpu']:.1f} -> {red['cpu']:.1f} us, "
        f"sequential (one round trip each) {py_one['seq_cpu']:.1f} -> {one['seq_cpu']:.1f} us; "
        f"sequential p50 {py_one['p50']:.1f} -> {one['p50']:.1f} us, "
        f"p99 {py_one['p99']:.1f} -> {one['p99']:.1f} us"
    )
    print(
        f"redis/memory: latency x{red['mean'] / mem['mean']:.1f} "
        f"(+{red['mean'] - mem['mean']:.1f} us per decision, "
        f"+{red['p99'] - mem['p99']:.1f} us at p99); "
        f"throughput x{red['rate'] / mem['rate']:.3f} ({red['rate']:.0f}/s vs {mem['rate']:.0f}/s)"
    )
    print(
        f"pipelined vs one run per call, c={args.concurrency}: throughput "
        f"x{red['rate'] / one['rate']:.2f}, CPU per decision "
        f"{one['cpu']:.1f} -> {red['cpu']:.1f} us"
        f" (reserve_many(8): {many['cpu']:.1f} us, x{many['rate'] / one['rate']:.2f} throughput)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="bound per phase")
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
