"""kill -9 under load: every call a client received has its audit record, and the file verifies.

callgate (a real `callgate serve` subprocess with an audit file) sits in front of an upstream
that answers every request with one allowed tool call whose id the client chose. Clients hammer
it with both APIs, streaming and not, and note each call id they receive; the process is killed
with SIGKILL at random moments and restarted on the same file. Afterwards the ids received must
be a subset of the ids on record, and `callgate audit verify` must pass across the restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.conftest import completion
from tests.native_pass import proxy_cli
from tests.redis_server import free_port
from tests.responses_streams import fc, response, stream_events
from tests.streams import chat_stream

ROOT = Path(__file__).resolve().parent.parent
KILLS = 4
WORKERS = 12


class Upstream:
    """Chat Completions and Responses, streaming and not, on a thread of its own; the call id
    is the last user message (chat) or the input (Responses)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call_id = body["messages"][-1]["content"]
        if not body.get("stream"):
            return web.json_response(completion(("t", {"n": 1}), ids=[call_id]))
        events = chat_stream(("t", {"n": 1}), ids=[call_id])
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return await self._sse(request, data + b"data: [DONE]\n\n")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = response(fc("t", {"n": 1}, body["input"]))
        if not body.get("stream"):
            return web.json_response(resp)
        return await self._sse(request, b"".join(stream_events(resp)))

    async def _sse(self, request: web.Request, data: bytes) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(data)
        await out.write_eof()
        return out

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> Upstream:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def start(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CALLGATE_UPSTREAM_URL", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                *proxy_cli(), "serve", "--config", str(config),
                *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    deadline = time.monotonic() + 30
    while not _healthy(f"http://127.0.0.1:{port}"):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "callgate did not start"
        time.sleep(0.05)
    return proc


def _ids_in(kind: str, payload: Any) -> list[str]:
    if kind.startswith("chat"):
        choices = payload.get("choices") or []
        out = []
        for choice in choices:
            part = choice.get("message") or choice.get("delta") or {}
            out += [c["id"] for c in part.get("tool_calls") or [] if c.get("id")]
        return out
    items = payload.get("output") or []
    if "item" in payload:
        items = [payload["item"]]
    elif "response" in payload:
        items = payload["response"].get("output") or []
    return [i["call_id"] for i in items if isinstance(i, dict) and i.get("call_id")]


async def one(session: aiohttp.ClientSession, url: str, kind: str, call_id: str) -> list[str]:
    stream = kind.endswith("stream")
    if kind.startswith("chat"):
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": call_id}]}
    else:
        path, body = "/v1/responses", {"model": "m", "input": call_id}
    if stream:
        body["stream"] = True
    seen: list[str] = []
    async with session.post(url + path, json=body) as resp:
        if resp.status != 200:
            return seen
        if not stream:
            return _ids_in(kind, json.loads(await resp.read()))
        async for line in resp.content:  # every id the moment its bytes arrive
            if line.startswith(b"data: {"):
                seen += _ids_in(kind, json.loads(line[6:]))
    return seen


async def load(url: str, received: set[str], stop: asyncio.Event, prefix: str) -> None:
    kinds = ["chat", "chat_stream", "responses", "responses_stream"]
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            n = next(counter)
            try:
                received.update(await one(session, url, kinds[n % 4], f"{prefix}_{n}"))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                await asyncio.sleep(0.01)  # killed mid-answer: what arrived is already noted

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(WORKERS)))


async def test_sigkill_under_load_loses_no_delivered_call(tmp_path: Path):
    audit = tmp_path / "audit.jsonl"
    log = tmp_path / "callgate.log"
    rng = random.Random(int(os.environ.get("CALLGATE_KILL_SEED", time.time_ns())))
    received: set[str] = set()
    with Upstream() as upstream:
        config = tmp_path / "callgate.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "upstream": {"base_url": f"http://127.0.0.1:{upstream.port}/v1"},
                    "audit": {"log": False, "file": str(audit)},
                    "tools": {"t": {"rules": [{"name": "r", "deny_if": "args.n > 5"}]}},
                }
            )
        )
        for round_ in range(KILLS + 1):
            port = free_port()
            proc = start(config, port, log)
            stop = asyncio.Event()
            task = asyncio.create_task(
                load(f"http://127.0.0.1:{port}", received, stop, f"r{round_}")
            )
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            if round_ < KILLS:
                os.kill(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
            stop.set()
            await asyncio.wait_for(task, 10)
    assert len(received) > 50, "the load produced too few calls to judge"
    on_record = set()
    for line in audit.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line is judged by verify below
        if isinstance(record, dict) and record.get("call_id"):
            on_record.add(record["call_id"])
    missing = received - on_record
    assert not missing, f"{len(missing)} delivered calls unrecorded, e.g. {sorted(missing)[:5]}"
    verify = subprocess.run(
        [*proxy_cli(), "audit", "verify", str(audit)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
