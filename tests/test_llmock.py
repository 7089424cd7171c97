"""End to end against llmock (PyPI), a mock OpenAI server written by others, with callgate in front.

llmock runs as a subprocess on a free loopback port (`llmock serve`); scenarios are queued with
`POST /_llmock/scenario` and what it received is read back from its journal `/_llmock/requests`.
llmock's own pytest plugin defines fixtures named `llmock` and `llmock_server`: ours are named
differently.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

LLMOCK_BIN = Path(sys.executable).with_name("llmock")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for name in ("get_weather", "delete_file")
]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
POLICY = {
    "tools": {
        "get_weather": {"rate_limit": {"max_calls": 10, "window": 60}},
        "delete_file": {"allow": False},
    }
}

pytestmark = pytest.mark.skipif(not LLMOCK_BIN.exists(), reason="llmock is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llmock_process() -> Iterator[str]:
    port = _free_port()
    # No inherited LLMOCK_* settings (error rates, faults, latency): a deterministic server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOCK_")}
    proc = subprocess.Popen(
        [
            str(LLMOCK_BIN),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--latency-ms",
            "0",
            "--response-style",
            "static",
            "--tool-mode",
            "off",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llmock exited early with code {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=0.5).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llmock did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mock:
    """llmock's control API (async, so the proxy on this event loop keeps running)."""

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url
        self.base_url = f"{url}/v1"
        self.http = http

    async def queue(self, *behaviors: dict[str, Any]) -> None:
        r = await self.http.post(f"{self.url}/_llmock/scenario", json={"behaviors": behaviors})
        assert r.status_code == 201, r.text

    async def reply_tools(self, *calls: tuple[str, dict[str, Any]], text: str | None = None):
        await self.queue(
            {
                "type": "reply",
                "text": text,
                "tool_calls": [{"name": n, "arguments": a} for n, a in calls],
            }
        )

    async def reply_text(self, text: str) -> None:
        await self.queue({"type": "reply", "text": text})

    async def bodies(self, path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
        r = await self.http.get(f"{self.url}/_llmock/requests")
        r.raise_for_status()
        return [req["body"] for req in r.json()["requests"] if req["path"] == path]

    async def pending(self) -> list[Any]:
        r = await self.http.get(f"{self.url}/_llmock/scenario")
        return r.json()["pending"]


@pytest.fixture
async def mock(llmock_process: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as http:
        (await http.post(f"{llmock_process}/_llmock/reset")).raise_for_status()
        yield Mock(llmock_process, http)
        await http.post(f"{llmock_process}/_llmock/reset")


async def gate(make_proxy: Any, mock: Mock, config: dict[str, Any] | None = None) -> Any:
    return await make_proxy(config if config is not None else POLICY, upstream_url=mock.base_url)


async def test_allowed_call_passes(make_proxy, mock):
    proxy = await gate(make_proxy, mock)
    await mock.reply_tools(("get_weather", {"city": "Paris"}))
    result = await proxy.client().chat.completions.create(
        model="gpt-4o", messages=MSGS, tools=TOOLS
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    (sent,) = await mock.bodies()
    assert sent["messages"] == MSGS
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "delete_file"]
    assert await mock.pending() == []


async def test_sync_client_agent_loop(make_proxy, mock):
    proxy = await gate(make_proxy, mock)
    await mock.reply_tools(("get_weather", {"city": "Oslo"}))
    await mock.reply_text("It is cold in Oslo.")
    client = proxy.sync_client()
    first = await asyncio.to_thread(
        client.chat.completions.create, model="gpt-4o", messages=MSGS, tools=TOOLS
    )
    call = first.choices[0].message.tool_calls[0]
    turn = [
        *MSGS,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "-3C"},
    ]
    second = await asyncio.to_thread(
        client.chat.completions.create, model="gpt-4o", messages=turn, tools=TOOLS
    )
    assert second.choices[0].message.content == "It is cold in Oslo."
    bodies = await mock.bodies()
    assert len(bodies) == 2
    assert bodies[1]["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "-3C"}


async def test_denied_tool_is_stripped(make_proxy, mock):
    proxy = await gate(make_proxy, mock, {**POLICY, "on_block": "strip"})
    seen: list[dict[str, Any]] = []
    proxy.state.auditor.listeners.append(seen.append)
    await mock.reply_tools(("delete_file", {"city": "/"}), text="Deleting it.")
    result = await proxy.client().chat.completions.create(
        model="gpt-4o", messages=MSGS, tools=TOOLS
    )
    choice = result.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert choice.message.content.startswith("Deleting it.\n\n[callgate] blocked tool call")
    assert "delete_file" in choice.message.content
    assert [(r["tool"], r["decision"], r["action"]) for r in seen] == [
        ("delete_file", "blocked", "strip")
    ]
    assert len(await mock.bodies()) == 1  # strip never asks again


async def test_all_blocked_reprompts_llmock(make_proxy, mock):
    proxy = await gate(make_proxy, mock)
    await mock.reply_tools(("delete_file", {"city": "/"}))
    await mock.reply_text("I am not allowed to delete files.")
    result = await proxy.client().chat.completions.create(
        model="gpt-4o", messages=MSGS, tools=TOOLS
    )
    assert result.choices[0].message.content == "I am not allowed to delete files."
    assert result.choices[0].message.tool_calls is None
    first, second = await mock.bodies()
    assert first["messages"] == MSGS
    assistant, tool_msg = second["messages"][-2:]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"][0]["function"]["name"] == "delete_file"
    assert tool_msg["role"] == "tool"
    assert tool_msg["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert json.loads(tool_msg["content"])["error"] == "tool_call_blocked"
    assert second["tools"] == first["tools"]  # asked again with the same parameters


async def test_partial_block_stash_reinserted_on_next_turn(make_proxy, mock):
    proxy = await gate(make_proxy, mock)  # on_block: reprompt (the default)
    await mock.reply_tools(("get_weather", {"city": "Paris"}), ("delete_file", {"city": "/"}))
    await mock.reply_text("Sunny, 21C.")
    client = proxy.client()
    first = await client.chat.completions.create(model="gpt-4o", messages=MSGS, tools=TOOLS)
    message = first.choices[0].message
    (allowed,) = message.tool_calls
    assert allowed.function.name == "get_weather"
    assert first.choices[0].finish_reason == "tool_calls"
    # The client runs the call it was given and sends its next turn.
    turn = [
        *MSGS,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": allowed.id, "content": "21C, sunny"},
    ]
    final = await client.chat.completions.create(model="gpt-4o", messages=turn, tools=TOOLS)
    assert final.choices[0].message.content == "Sunny, 21C."
    first_sent, second_sent = await mock.bodies()
    assert first_sent["messages"] == MSGS
    # What llmock answered first holds both calls; its ids are random, so read them back.
    msgs = second_sent["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    calls = {c["function"]["name"]: c for c in msgs[1]["tool_calls"]}
    assert set(calls) == {"get_weather", "delete_file"}
    assert calls["get_weather"]["id"] == allowed.id
    blocked = calls["delete_file"]
    assert json.loads(blocked["function"]["arguments"]) == {"city": "/"}
    results = {m["tool_call_id"]: m["content"] for m in msgs[2:]}
    assert results[allowed.id] == "21C, sunny"
    error = json.loads(results[blocked["id"]])
    assert error["error"] == "tool_call_blocked"
    assert error["gate"] == "rules" and error["reason"] == "tool_not_allowed"
    # Every call in the conversation has exactly one result.
    assert sorted(results) == sorted(c["id"] for c in msgs[1]["tool_calls"])


async def test_error_mode_raises_permission_denied(make_proxy, mock):
    import openai

    proxy = await gate(make_proxy, mock, {**POLICY, "on_block": "error"})
    await mock.reply_tools(("delete_file", {"city": "/"}))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=MSGS, tools=TOOLS)
    assert err.value.body["type"] == "tool_call_blocked"
    assert err.value.body["code"] == "rules"


async def test_passthrough_models_and_text_stream(make_proxy, mock):
    proxy = await gate(make_proxy, mock)
    client = proxy.client()
    models = await client.models.list()
    assert len(models.data) > 0
    await mock.reply_text("Hello from the stream")
    stream = await client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == "Hello from the stream"
