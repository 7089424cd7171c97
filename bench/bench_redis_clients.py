"""Redis clients weighed for the store's hot path: the same EVALSHA through each asyncio client.

    python -m bench.bench_redis_clients [--count 5000] [--redis-url URL]

Prints, per client, the CPU of this process per call, one call at a time and with 32 in flight
(Redis's own CPU is another process's). Clients: redis-py's asyncio client (with hiredis when
installed), coredis (RESP3; measured only when installed: `pip install coredis`, not a
dependency of callgate) and the store's slim client (`proxy.store.resp`). Every phase is
bounded by --count calls and --max-seconds. Without --redis-url it starts its own redis-server
on a free loopback port (bench.bench_store.start_redis) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import time
from collections.abc import Awaitable, Callable

from bench.bench_store import start_redis
from proxy.store.resp import Wire, pack

SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
IN_FLIGHT = 32


async def measure(
    name: str, call: Callable[[], Awaitable[object]], count: int, max_seconds: float
) -> None:
    for _ in range(min(200, count)):
        await call()

    async def calls(n: int) -> int:
        deadline = time.monotonic() + max_seconds
        done = 0
        while done < n and time.monotonic() < deadline:
            await call()
            done += 1
        return done

    started = time.process_time()
    done = await calls(count)
    sequential = (time.process_time() - started) / max(done, 1) * 1e6
    started = time.process_time()
    results = await asyncio.gather(*(calls(count // IN_FLIGHT) for _ in range(IN_FLIGHT)))
    concurrent = (time.process_time() - started) / max(sum(results), 1) * 1e6
    print(
        f"{name:9s} one at a time: {sequential:6.1f} µs CPU per call; "
        f"{IN_FLIGHT} in flight: {concurrent:6.1f} µs"
    )


async def main_async(url: str, count: int, max_seconds: float) -> None:
    import redis.asyncio as aioredis
    from redis.utils import HIREDIS_AVAILABLE

    client = aioredis.Redis.from_url(url, max_connections=IN_FLIGHT)
    sha = await client.script_load(SCRIPT)
    print(
        f"{count} calls per phase; redis-py parser: {'hiredis' if HIREDIS_AVAILABLE else 'Python'}"
    )
    await measure("redis-py", lambda: client.evalsha(sha, 1, "k", 1), count, max_seconds)
    await client.aclose()
    if importlib.util.find_spec("coredis") is not None:
        import coredis

        async with coredis.Redis.from_url(url) as core:
            await measure("coredis", lambda: core.evalsha(sha, ["k"], [1]), count, max_seconds)
    else:
        print("coredis   not installed (pip install coredis): skipped")
    wire = Wire(url)
    command = pack("EVALSHA", sha, 1, "k", 1)
    await measure("slim", lambda: wire.execute(command), count, max_seconds)
    wire.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    if args.redis_url:
        asyncio.run(main_async(args.redis_url, args.count, args.max_seconds))
        return
    proc, url, workdir = start_redis()
    try:
        asyncio.run(main_async(url, args.count, args.max_seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
