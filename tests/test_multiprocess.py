"""Several `callgate serve` processes sharing one Redis: one set of limits, budgets and stashes.

Three real callgate processes (subprocesses of this test) sit in front of a tiny upstream that
answers every request with the tool calls the test asks for; clients hammer them concurrently
with one principal, and the totals must come out exactly as if there were one process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import completion
from tests.native_pass import proxy_cli
from tests.redis_server import RedisServer, free_port, start_redis

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 3


class ThreadedUpstream:
    """An OpenAI-compatible upstream on its own thread and loop (the test loops come and go).

    The last user message is a JSON list of [name, call id] pairs: the answer calls those tools.
    A request whose last message is a tool result gets a plain text answer.
    """

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.received.append(body)
        last = body["messages"][-1]
        if last["role"] != "user":
            return web.json_response(completion(content="done"))
        calls = json.loads(last["content"])
        return web.json_response(
            completion(*((name, {"n": 1}) for name, _ in calls), ids=[i for _, i in calls])
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10), "upstream did not start"

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Cluster:
    redis: RedisServer
    upstream: ThreadedUpstream
    urls: list[str] = field(default_factory=list)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status
    except OSError:
        return 0


def policy(upstream: str, redis_url: str) -> dict[str, Any]:
    return {
        "upstream": {"base_url": upstream},
        "principal": {"from": ["header:x-callgate-principal"]},
        "store": {"backend": "redis", "url": redis_url, "timeout": 2},
        "audit": {"log": False},
        "on_block": "reprompt",
        "budgets": {"b": {"max_spend": "1.00", "window": 3600}},
        "tools": {
            "t_rate": {"rate_limit": {"max_calls": 50, "window": 3600}, "on_block": "error"},
            "t_budget": {"budget": {"ledger": "b", "cost": "0.03"}, "on_block": "error"},
            "bad": {"allow": False},
        },
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    redis = start_redis()
    upstream = ThreadedUpstream()
    upstream.start()
    config = tmp / "callgate.yaml"
    config.write_text(yaml.safe_dump(policy(upstream.url, redis.url)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CALLGATE_UPSTREAM_URL", None)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    cluster = Cluster(redis, upstream)
    try:
        for i in range(PROCESSES):
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
            procs.append((proc, log))
            cluster.urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for (proc, log), url in zip(procs, cluster.urls, strict=True):
            while _get(url + "/healthz") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"callgate did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            assert _get(url + "/readyz") == 200
        yield cluster
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        upstream.stop()
        redis.cleanup()


async def hammer(urls: list[str], tool: str, total: int, principal: str) -> dict[Any, int]:
    """`total` concurrent requests, round-robin over `urls`; counts 'allowed' and block codes."""
    counts: dict[Any, int] = {}
    spec = json.dumps([[tool, "call_1"]])
    body = {"model": "m", "messages": [{"role": "user", "content": spec}]}
    headers = {"x-callgate-principal": principal, "Authorization": "Bearer sk-test"}
    sem = asyncio.Semaphore(48)

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        async with sem:
            async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                data = await r.json()
            if r.status == 200:
                assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == tool
                key: Any = "allowed"
            else:
                assert r.status == 403, data
                key = data["error"]["code"]
            counts[key] = counts.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(one(session, urls[i % len(urls)]) for i in range(total)))
        assert time.monotonic() - started < 30
    return counts


@pytest.mark.parametrize("processes", [2, 3])
async def test_rate_limit_is_shared(cluster: Cluster, processes: int):
    urls = cluster.urls[:processes]
    counts = await hammer(urls, "t_rate", 90, f"rate-{uuid.uuid4().hex}")
    assert counts == {"allowed": 50, "rate_limit": 40}


@pytest.mark.parametrize("processes", [2, 3])
async def test_budget_is_shared(cluster: Cluster, processes: int):
    urls = cluster.urls[:processes]
    counts = await hammer(urls, "t_budget", 50, f"budget-{uuid.uuid4().hex}")
    assert counts == {"allowed": 33, "budget": 17}


async def test_stash_written_by_one_process_is_read_by_another(cluster: Cluster):
    a, b = cluster.urls[0], cluster.urls[1]
    tag = uuid.uuid4().hex[:8]
    ok_id, bad_id = f"call_ok_{tag}", f"call_bad_{tag}"
    user = {"role": "user", "content": json.dumps([["ok", ok_id], ["bad", bad_id]])}
    headers = {"x-callgate-principal": f"stash-{tag}", "Authorization": "Bearer sk-test"}
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [user]}
        async with session.post(f"{a}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            first = await r.json()
        message = first["choices"][0]["message"]
        assert [c["id"] for c in message["tool_calls"]] == [ok_id]  # bad was dropped, stashed
        turn = [user, message, {"role": "tool", "tool_call_id": ok_id, "content": "42"}]
        body = {"model": "m", "messages": turn}
        async with session.post(f"{b}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            final = await r.json()
    assert final["choices"][0]["message"]["content"] == "done"
    with cluster.upstream.lock:
        sent = next(
            m["messages"]
            for m in reversed(cluster.upstream.received)
            if m["messages"][-1]["role"] != "user" and m["messages"][0] == user
        )
    assistant = sent[1]
    assert [c["id"] for c in assistant["tool_calls"]] == [ok_id, bad_id]
    results = {m["tool_call_id"]: m["content"] for m in sent if m["role"] == "tool"}
    assert results[ok_id] == "42"
    error = json.loads(results[bad_id])
    assert error["error"] == "tool_call_blocked" and error["gate"] == "rules"
