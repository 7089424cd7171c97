"""Shared fixtures: a scripted upstream, callgate itself, a fake clock, and OpenAI clients.

Everything runs on 127.0.0.1: a real aiohttp server for the upstream, the real callgate app in
front of it, and the real `openai` SDK as the client.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# tests/run's second pass: the compiled build of the package (python -m proxy.native build DIR)
# goes ahead of the working tree, which pytest put first. Nothing has imported proxy yet.
if os.environ.get("CALLGATE_NATIVE"):
    sys.path.insert(0, os.environ["CALLGATE_NATIVE"])

import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from proxy.app import create_app
from proxy.policy import load_policy_text
from proxy.server import make_runner
from proxy.state import STATE, AppState

# The files that spend seconds waiting (subprocesses, a browser, timeouts that must run out),
# longest first, as `--durations` measured them. tests/run hands whole files to its xdist
# workers in collection order (--dist loadfile --no-loadscope-reorder); these go first, so the
# run ends on many short files spread over the workers, not on one long file running alone
# while the others idle. Only the order changes; a stale name costs balance, nothing else.
SLOW_FILES = (
    "test_deploy.py",  # on a fresh clone it pip-installs kubectl first
    "test_bench_smoke.py",
    "test_upstream_bounds.py",
    "test_audit_kill.py",
    "test_workers.py",
    "test_slowloris.py",
    "test_redis_burst.py",
    "test_audit_durability.py",
    "test_http1.py",
    "test_approval_page.py",
    "test_hostile_input.py",
    "test_multiprocess.py",
    "test_responses_review.py",
    "test_first_run.py",
    "test_auth_serve.py",
    "test_operations.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order


class GuardedTestServer(TestServer):
    """The app behind the runner `callgate serve` uses (protocol errors in OpenAI's shape,
    header and idle timeouts, the connection bound), so every test meets the real server."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return make_runner(self.app, self.app[STATE].policy.config.server)


class FakeClock:
    """Wall-clock stand-in: tests move time instead of sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Script = dict[str, Any] | Callable[[Received], Any] | web.StreamResponse


@dataclass
class ScriptedUpstream:
    """An OpenAI-compatible server that answers from a queue and records what it received."""

    replies: list[Any] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def push(self, *replies: Any) -> None:
        self.replies.extend(replies)

    def bodies(self, path: str = "/v1/chat/completions") -> list[Any]:
        return [r.body for r in self.received if r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        rec = Received(request.method, request.path, dict(request.headers), body)
        self.received.append(rec)
        if not self.replies:
            return web.json_response(
                {
                    "error": {
                        "message": "script exhausted",
                        "type": "test",
                        "param": None,
                        "code": None,
                    }
                },
                status=500,
            )
        reply = self.replies.pop(0)
        if callable(reply):
            reply = reply(rec)
            if asyncio.iscoroutine(reply):
                reply = await reply
        if isinstance(reply, SSE):
            return await reply.send(request)
        if isinstance(reply, web.StreamResponse):
            return reply
        return web.json_response(reply)


@dataclass
class SSE:
    """A scripted event stream: each item is a JSON-able event (or raw bytes), sent in order."""

    events: list[Any]
    done: bool = True
    delay: float = 0.0
    sent: int = 0  # events written before the stream ended
    aborted: bool = False  # the reader (callgate) went away mid-stream

    async def send(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for event in self.events:
                if isinstance(event, bytes):
                    await resp.write(event)
                else:
                    await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.sent += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
            if self.done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.aborted = True
            raise
        return resp


def completion(
    *calls: tuple[str, Any],
    content: str | None = None,
    ids: list[str] | None = None,
    usage: dict[str, int] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A chat.completion with the given (name, arguments) tool calls."""
    tool_calls = []
    for i, (name, args) in enumerate(calls):
        call_id = ids[i] if ids else f"call_{name}_{i}"
        arguments = args if isinstance(args, str) else json.dumps(args)
        tool_calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@dataclass
class Proxy:
    server: TestServer
    state: AppState
    clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    @property
    def root(self) -> str:
        return str(self.server.make_url(""))

    def client(self, **kw: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url, api_key="sk-test-key", max_retries=0, **kw)
        self.clients.append(client)
        return client

    def sync_client(self, **kw: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url, api_key="sk-test-key", max_retries=0, **kw)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        # Closed while the loop runs: a client collected after it closes logs loop errors.
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()
        self.clients.clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> ScriptedUpstream:
    scripted = ScriptedUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", scripted.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    scripted.url = str(server.make_url("/v1"))
    return scripted


def policy_from(config: dict[str, Any] | str, upstream_url: str) -> Any:
    data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
    data.setdefault("upstream", {})
    data["upstream"] = {**data["upstream"], "base_url": upstream_url}
    return load_policy_text(yaml.safe_dump(data), "<test>")


@pytest.fixture
async def make_proxy(
    aiohttp_server: Any, upstream: ScriptedUpstream, clock: FakeClock, monkeypatch: Any
):
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)
    made: list[Proxy] = []

    async def make(
        config: dict[str, Any] | str, *, upstream_url: str | None = None, **kw: Any
    ) -> Proxy:
        policy = policy_from(config, upstream_url or upstream.url)
        kw.setdefault("clock", clock)
        app = create_app(policy, **kw)
        server = GuardedTestServer(app, host="127.0.0.1")
        await server.start_server()
        proxy = Proxy(server, app[STATE])
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close_clients()
        await proxy.server.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def records(proxy: Any) -> list[dict[str, Any]]:
    """Every audit record the proxy makes from now on, as it makes it."""
    out: list[dict[str, Any]] = []
    proxy.state.auditor.listeners.append(out.append)
    return out
