"""A cold burst on a freshly started Redis store gets exactly the limit, never `store_error`.

Three real callgate processes start against a fresh redis-server and at once take 200 concurrent
requests, each answered by the upstream with one rate-limited tool call: exactly the limit is
allowed and every other call is blocked by the rate limit. Before the fix, local queueing for
a Redis connection counted against `store.timeout` and blocked 12 to 171 of them as
`store_error`. The unit tests below pin what the timeout covers: the wait for a free connection
is not Redis being slow (a pool of 2 serves 50 concurrent reservations under a short timeout),
while a Redis that really stalls still fails each call after `store.timeout`, and a wait for a
connection past `store.pool_timeout` is a store error too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from proxy.config import ConfigError, parse_config
from proxy.gates import decide
from proxy.policy import load_policy_text
from proxy.store import SlotRequest
from proxy.store.redis import RELEASE_LUA, RESERVE_LUA, RedisStore
from proxy.toolcalls import CallContext, ToolCall
from tests.native_pass import proxy_cli
from tests.redis_server import RedisServer, free_port, redis_server_fixture  # noqa: F401
from tests.test_multiprocess import ThreadedUpstream, _get

ROOT = Path(__file__).resolve().parent.parent
SHA = [hashlib.sha1(script.encode()).hexdigest() for script in (RESERVE_LUA, RELEASE_LUA)]
PROCESSES = 3
BURST = 200
LIMIT = 50


def policy(upstream: str, redis_url: str, audit_file: Path) -> dict[str, Any]:
    return {
        "upstream": {"base_url": upstream},
        # The setting: the default timeout, and a pool smaller than the burst.
        "store": {"backend": "redis", "url": redis_url, "timeout": 0.5, "pool_size": 16},
        "audit": {"log": False, "file": str(audit_file)},
        "tools": {
            "t_rate": {
                "rate_limit": {"max_calls": LIMIT, "window": 3600, "scope": "global"},
                "on_block": "error",
            },
        },
    }


def start_processes(tmp: Path, upstream: str, redis_url: str) -> list[tuple[Any, Path, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CALLGATE_UPSTREAM_URL", None)
    procs = []
    for i in range(PROCESSES):
        config = tmp / f"callgate-{i}.yaml"
        config.write_text(yaml.safe_dump(policy(upstream, redis_url, tmp / f"audit-{i}.jsonl")))
        port = free_port()
        log = tmp / f"callgate-{i}.log"
        with open(log, "wb") as out:
            cmd = [*proxy_cli(), "serve", "--config", str(config)]
            proc = subprocess.Popen(
                [*cmd, "--host", "127.0.0.1", "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        procs.append((proc, log, f"http://127.0.0.1:{port}"))
    return procs


def stop_processes(procs: list[tuple[Any, Path, str]]) -> None:
    for proc, _, _ in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc, _, _ in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def threaded_upstream() -> Iterator[ThreadedUpstream]:
    server = ThreadedUpstream()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def burst(urls: list[str], total: int) -> dict[Any, int]:
    """`total` requests all in flight at once, round-robin over `urls`."""
    counts: dict[Any, int] = {}
    body = {"model": "m", "messages": [{"role": "user", "content": json.dumps([["t_rate", "c"]])}]}
    headers = {"Authorization": "Bearer sk-test"}
    go = asyncio.Event()

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        await go.wait()
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            data = await r.json()
        if r.status == 200:
            assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "t_rate"
            key: Any = "allowed"
        else:
            assert r.status == 403, data
            key = data["error"]["code"]
        counts[key] = counts.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one(session, urls[i % len(urls)])) for i in range(total)]
        await asyncio.sleep(0)  # every task is parked at `go`: release them together
        go.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
    return counts


def read_records(files: list[Path], expected: int) -> list[dict[str, Any]]:
    """The audit records of every process, once `expected` of them are on disk (bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        records = []
        for f in files:
            if f.exists():
                lines = f.read_text().splitlines()
                records += [json.loads(line) for line in lines if '"call_id"' in line]
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


async def test_cold_burst_across_three_processes_gets_exactly_the_limit(
    redis_server: RedisServer, threaded_upstream: ThreadedUpstream, tmp_path: Path
):
    procs = start_processes(tmp_path, threaded_upstream.url, redis_server.url)
    try:
        deadline = time.monotonic() + 30
        for proc, log, url in procs:
            # Only liveness: the burst comes right after start, before anyone probed /readyz.
            while _get(url + "/healthz") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"callgate did not start:\n{log.read_text()[-3000:]}")
                await asyncio.sleep(0.02)
        counts = await burst([url for _, _, url in procs], BURST)
    finally:
        stop_processes(procs)  # flushes and closes the audit files
    assert counts == {"allowed": LIMIT, "rate_limit": BURST - LIMIT}, counts
    records = read_records([tmp_path / f"audit-{i}.jsonl" for i in range(PROCESSES)], BURST)
    assert len(records) == BURST
    reasons: dict[Any, int] = {}
    for r in records:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    assert reasons == {None: LIMIT, "max_calls": BURST - LIMIT}, reasons
    assert not any(r["fail_open"] for r in records)
    latencies = sorted(r["latency_ms"] for r in records)
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\ncold burst: decision latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")


# --- What `store.timeout` covers -----------------------------------------------------------


class DelayProxy:
    """A TCP relay on loopback in front of Redis that holds every reply back by `delay`:
    a Redis whose every round trip takes `delay`, on the wire rather than in this process."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer, 0.0), self._pump(up_reader, writer, self.delay)):
            task = asyncio.create_task(pump)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
        try:
            while chunk := await src.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def test_waiting_for_a_connection_does_not_count_against_the_timeout(
    redis_server: RedisServer,
):
    """50 concurrent reservations through 2 connections to a Redis answering in 50 ms: the last
    ones wait ~1.25 s for a connection, three times the timeout, and every one succeeds. (The
    timeout keeps 0.35 s of margin over the round trip: a loaded CI machine must not fail it.)"""
    proxy = DelayProxy(redis_server.port, delay=0.05)
    await proxy.start()
    # max_batch=1: one call per script run, so the 50 calls really queue for the connections
    # (pipelined, they would go out as one batch; tests/test_redis_pipelining.py covers that).
    store = RedisStore(proxy.url, timeout=0.4, pool_size=2, pool_timeout=10, max_batch=1)
    try:
        await store.start()
        assert proxy.connections == 2  # opened at start, before any call
        item = SlotRequest(f"rl:{uuid.uuid4().hex}", max_calls=50, window=3600, cooldown=0)
        started = time.monotonic()
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(store.reserve([item]) for _ in range(50)))
        elapsed = time.monotonic() - started
        assert all(r.outcomes[0].ok for r in results)
        assert sorted(r.outcomes[0].count for r in results) == list(range(50))
        assert elapsed > 2 * 0.4  # the queue really was longer than the timeout
        assert proxy.connections == 2  # the pool did not grow past pool_size
        blocked = await store.reserve([item])
        assert not blocked.outcomes[0].ok and blocked.outcomes[0].limit == "max_calls"
    finally:
        await store.close()
        await proxy.close()


def gate_policy() -> Any:
    limit = {"max_calls": 100, "window": 60}
    return load_policy_text(
        yaml.safe_dump(
            {
                "tools": {
                    "closed": {"rate_limit": limit},
                    "open": {"rate_limit": {**limit, "on_store_error": "fail_open"}},
                }
            }
        )
    )


async def decide_one(store: RedisStore, tool: str) -> tuple[Any, float]:
    ctx = CallContext(principal="p", request_id=uuid.uuid4().hex, route="test")
    started = time.monotonic()
    decision = await decide(
        ToolCall(f"call_{uuid.uuid4().hex}", tool, "{}"), gate_policy(), store, ctx
    )
    return decision, time.monotonic() - started


async def test_a_stalled_redis_still_fails_each_call_after_the_timeout(redis_server: RedisServer):
    """Redis stopped dead (SIGSTOP: connected, never answering): each call holding a connection
    fails after `timeout`, and each gate applies its on_store_error."""
    store = RedisStore(redis_server.url, timeout=0.2, pool_size=2, pool_timeout=5)
    assert redis_server.proc is not None
    try:
        await store.start()
        assert (await decide_one(store, "closed"))[0].allowed
        redis_server.proc.send_signal(19)  # SIGSTOP
        try:
            started = time.monotonic()
            async with asyncio.timeout(5):
                results = await asyncio.gather(
                    *(decide_one(store, tool) for tool in ("closed", "open") * 2)
                )
            elapsed = time.monotonic() - started
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
        for (decision, took), tool in zip(results, ("closed", "open") * 2, strict=True):
            assert 0.15 < took < 1.0, took  # one or two rounds of the 0.2 s timeout
            if tool == "closed":
                assert decision.block is not None
                assert (decision.block.gate, decision.block.reason) == ("rate_limit", "store_error")
                assert "no answer within 0.2s" in decision.block.message
            else:
                assert decision.allowed and decision.fail_open == ["rate_limit"]
        assert elapsed < 1.0  # 4 calls over 2 connections: two rounds of the timeout
        await store.ping()
        assert (await decide_one(store, "closed"))[0].allowed
    finally:
        await store.close()


async def test_a_wait_for_a_connection_past_pool_timeout_is_a_store_error(
    redis_server: RedisServer,
):
    """One connection held by a call Redis does not answer: the next call gives up waiting
    after `pool_timeout`, with the gate's on_store_error."""
    store = RedisStore(redis_server.url, timeout=1.0, pool_size=1, pool_timeout=0.2)
    assert redis_server.proc is not None
    try:
        await store.start()
        redis_server.proc.send_signal(19)  # SIGSTOP
        try:
            async with asyncio.timeout(5):
                first = asyncio.create_task(decide_one(store, "closed"))
                await asyncio.sleep(0.05)  # the first call holds the only connection
                waiting_closed, waiting_open = await asyncio.gather(
                    decide_one(store, "closed"), decide_one(store, "open")
                )
                held = await first
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
        decision, took = waiting_closed
        assert decision.block is not None and decision.block.reason == "store_error"
        assert "no free connection within 0.2s" in decision.block.message
        assert 0.15 < took < 0.8, took
        decision, took = waiting_open
        assert decision.allowed and decision.fail_open == ["rate_limit"]
        assert 0.15 < took < 0.8, took
        decision, took = held
        assert decision.block is not None and "no answer within 1s" in decision.block.message
        assert 0.9 < took < 2.0, took
        assert (await decide_one(store, "closed"))[0].allowed
    finally:
        await store.close()


# --- Warm-up --------------------------------------------------------------------------------


async def client_count(raw: aioredis.Redis) -> int:
    return len(await raw.client_list()) - 1  # not counting `raw` itself


async def test_start_opens_the_pool_and_loads_the_scripts(redis_server: RedisServer):
    raw = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url, pool_size=5)
    try:
        assert await raw.script_exists(*SHA) == [False, False]  # a fresh Redis
        await store.start()
        assert await client_count(raw) == 5
        assert await raw.script_exists(*SHA) == [True, True]
        stats = await raw.info("commandstats")
        assert (await store.reserve([SlotRequest("rl:w", 1, 60, 0)])).outcomes[0].ok
        after = await raw.info("commandstats")
        # The first reservation ran its script directly: no NOSCRIPT, no SCRIPT LOAD.
        assert (
            after["cmdstat_evalsha"]["calls"]
            == stats.get("cmdstat_evalsha", {}).get("calls", 0) + 1
        )
        assert after["cmdstat_evalsha"].get("failed_calls", 0) == 0
        assert await client_count(raw) == 5
    finally:
        await store.close()
        await raw.aclose()


async def test_start_with_redis_down_is_not_fatal_and_readiness_warms_up_later(
    redis_server: RedisServer,
):
    redis_server.stop()
    store = RedisStore(redis_server.url, timeout=0.2, pool_size=3, pool_timeout=1)
    try:
        await store.start()  # logged, not raised: /readyz reports the store
        with pytest.raises(Exception, match="redis"):
            await store.ping()
        redis_server.start()
        await store.ping()  # warms up now
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await client_count(raw) == 3
            assert await raw.script_exists(*SHA) == [True, True]
        finally:
            await raw.aclose()
        # Restarted (empty script cache): NOSCRIPT, reloaded, answered.
        redis_server.restart()
        assert (await store.reserve([SlotRequest("rl:x", 1, 60, 0)])).outcomes[0].ok
    finally:
        await store.close()


def test_pool_settings_are_validated():
    config, _ = parse_config("store: {backend: redis, pool_size: 8, pool_timeout: 2s}")
    assert (config.store.pool_size, config.store.pool_timeout) == (8, 2.0)
    default, _ = parse_config("{}")
    assert (default.store.pool_size, default.store.pool_timeout) == (32, 5.0)
    for bad in ("pool_size: 0", "pool_timeout: 0"):
        with pytest.raises(ConfigError, match=bad.split(":")[0]):
            parse_config(f"store: {{{bad}}}")
