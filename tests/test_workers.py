"""`callgate serve --workers N`: N processes on one port (SO_REUSEPORT) sharing one Redis.

A real `callgate serve --workers 2` (a subprocess of this test) in front of a tiny threaded
upstream and a private redis-server: a burst of 200 concurrent requests gets exactly the limit
across both workers, each worker keeps its own audit chain, /metrics adds the workers up,
SIGTERM drains both, and the memory store is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.audit import verify_chain
from proxy.native import MODULES
from tests.conftest import completion
from tests.native_pass import COMPILED, proxy_cli
from tests.redis_server import RedisServer, free_port, redis_server_fixture  # noqa: F401
from tests.test_multiprocess import ThreadedUpstream, _get
from tests.test_redis_burst import burst

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 50
SLOW = 1.5  # seconds the upstream takes to answer a "slow" request


class SlowUpstream(ThreadedUpstream):
    """ThreadedUpstream, plus: a last user message "slow" is answered after SLOW seconds."""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["messages"][-1]["content"] == "slow":
            await asyncio.sleep(SLOW)
            return web.json_response(completion(content="slow done"))
        with self.lock:
            self.received.append(body)
        return web.json_response(
            completion(
                *((name, {"n": 1}) for name, _ in json.loads(body["messages"][-1]["content"]))
            )
        )


@pytest.fixture
def upstream() -> Iterator[SlowUpstream]:
    server = SlowUpstream()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_config(tmp: Path, upstream: str, store: dict[str, Any]) -> Path:
    config = tmp / "callgate.yaml"
    policy = {
        "upstream": {"base_url": upstream},
        "store": store,
        "audit": {"log": False, "file": str(tmp / "audit.jsonl")},
        "server": {"reload_interval": 0},
        "tools": {
            "t_rate": {
                "rate_limit": {"max_calls": LIMIT, "window": 3600, "scope": "global"},
                "on_block": "error",
            },
        },
    }
    config.write_text(yaml.safe_dump(policy))
    return config


def serve(config: Path, port: int, log: Path, workers: str = "2") -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CALLGATE_UPSTREAM_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [*proxy_cli(), "serve", "--config", str(config), "--workers", workers]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_listening(proc: subprocess.Popen[bytes], log: Path, workers: int) -> None:
    """Until every worker has logged `listening` (so the burst reaches both), each running
    the build this pass tests (every module compiled in the compiled pass, none otherwise)."""
    deadline = time.monotonic() + 30
    while log.read_text().count('"listening"') < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"callgate did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    lines = [json.loads(line) for line in log.read_text().splitlines() if '"listening"' in line]
    compiled = {line["compiled"] for line in lines if line.get("event") == "listening"}
    assert compiled == {len(MODULES) if COMPILED else 0}


async def decisions_total(url: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
    pattern = r'^callgate_tool_call_decisions_total\{[^}]*tool="t_rate"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


async def test_two_workers_hit_exactly_the_limit_with_own_audit_chains_and_summed_metrics(
    redis_server: RedisServer, upstream: SlowUpstream, tmp_path: Path
):
    store = {"backend": "redis", "url": redis_server.url, "timeout": 0.5, "pool_size": 8}
    config = write_config(tmp_path, upstream.url, store)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve(config, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(proc, log, 2)
        counts = await burst([url], 200)
        assert counts == {"allowed": LIMIT, "rate_limit": 200 - LIMIT}, counts
        # Every scrape, whichever worker answers it, counts both workers' decisions: its own
        # live, the other's from a snapshot at most a second old.
        await asyncio.sleep(1.5)
        for _ in range(6):
            assert await decisions_total(url) == 200
    finally:
        assert stop(proc) == 0
    files = sorted(tmp_path.glob("audit.jsonl.w*"))
    assert [f.name for f in files] == ["audit.jsonl.w0", "audit.jsonl.w1"]
    records = 0
    for f in files:
        result = verify_chain(str(f))
        assert result.problem is None and not result.torn_tail, result
        served = sum('"call_id"' in line for line in f.read_text().splitlines())
        assert served > 0  # the kernel spread the connections over both workers
        records += served
    assert records == 200
    assert not (tmp_path / "audit.jsonl").exists()


async def test_sigterm_drains_both_workers(
    redis_server: RedisServer, upstream: SlowUpstream, tmp_path: Path
):
    store = {"backend": "redis", "url": redis_server.url}
    config = write_config(tmp_path, upstream.url, store)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve(config, port, log)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "m", "messages": [{"role": "user", "content": "slow"}]}
    try:
        wait_listening(proc, log, 2)

        async def slow() -> tuple[int, Any]:
            # A connection of its own each: spread over the workers by the kernel.
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"}
                ) as r:
                    return r.status, await r.json()

        # 12 connections: the kernel puts all of them on one worker once in 2048 runs.
        tasks = [asyncio.create_task(slow()) for _ in range(12)]
        await asyncio.sleep(SLOW / 3)  # all reached the upstream and wait for its answer
        assert not any(t.done() for t in tasks)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(proc.wait, 15)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    assert all(status == 200 for status, _ in results), results
    assert all(data["choices"][0]["message"]["content"] == "slow done" for _, data in results)
    assert took < SLOW + 5
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.count("draining") == 2  # each worker drained
    assert events.count("stopped") == 3  # both workers, then the parent
    assert (await asyncio.to_thread(_get, f"{url}/healthz")) == 0  # and nothing listens now


def test_workers_refuse_the_memory_store(upstream: SlowUpstream, tmp_path: Path):
    config = write_config(tmp_path, upstream.url, {"backend": "memory"})
    log = tmp_path / "serve.log"
    proc = serve(config, free_port(), log)
    assert proc.wait(20) == 2
    out = log.read_text()
    assert "--workers 2 needs store.backend: redis" in out
    assert "2 times what it says" in out
    proc = serve(config, free_port(), log, workers="0")
    assert proc.wait(20) == 2
    assert "--workers 0: must be at least 1" in log.read_text()


def test_workers_auto_is_the_cpus_this_process_may_use():
    from proxy.server import resolve_workers

    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers("3") == 3
