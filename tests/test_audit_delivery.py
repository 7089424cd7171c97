"""Audit before delivery through the routes: a call whose record cannot be written is never
delivered, on both APIs, streaming and not; with a working file, every delivered call's record
is in the file by the time the client has the call."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import SSE, completion
from tests.native_pass import spies_on_internals
from tests.responses_streams import FakeResponses, fc, msg, response
from tests.streams import chat_stream

MSGS = [{"role": "user", "content": "hi"}]


def on_file(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line).get("call_id") for line in path.read_bytes().splitlines()}


async def post(url: str, body: dict[str, Any]) -> tuple[int, list[bytes]]:
    """Status and the raw lines of the answer, read as they arrive."""
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        return resp.status, [line async for line in resp.content]


def push(upstream: Any, api: str, stream: bool) -> None:
    if api == "chat":
        if stream:
            upstream.push(SSE(chat_stream(("ok", {"a": 1}), ids=["c_ok"], text="Sure")))
        else:
            upstream.push(completion(("ok", {"a": 1}), ids=["c_ok"]))
    else:
        upstream.push(FakeResponses().reply(response(msg("Sure"), fc("ok", {"a": 1}, "c_ok"))))


def request(proxy: Any, api: str, stream: bool) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": "m", "stream": stream}
    if api == "chat":
        return proxy.url + "/chat/completions", {**body, "messages": MSGS}
    return proxy.url + "/responses", {**body, "input": "hi"}


CASES = [("chat", False), ("chat", True), ("responses", False), ("responses", True)]


@pytest.mark.parametrize("api,stream", CASES)
async def test_unwritable_audit_file_withholds_the_call(
    make_proxy, upstream, tmp_path, api, stream
):
    path = tmp_path / "missing-dir" / "audit.jsonl"
    proxy = await make_proxy({"audit": {"file": str(path)}})
    push(upstream, api, stream)
    status, lines = await post(*request(proxy, api, stream))
    raw = b"".join(lines)
    assert b"c_ok" not in raw  # the call never reached the client
    if stream:
        assert status == 200
        errors = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
        codes = [e.get("code") or (e.get("error") or {}).get("code") for e in errors]
        assert "audit_unavailable" in codes
    else:
        assert status == 503
        assert json.loads(raw)["error"]["code"] == "audit_unavailable"


@pytest.mark.parametrize("api,stream", CASES)
async def test_delivered_call_is_on_file_when_the_client_has_it(
    make_proxy, upstream, tmp_path, api, stream
):
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy({"audit": {"file": str(path), "log": False}})
    push(upstream, api, stream)
    url, body = request(proxy, api, stream)
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if b"c_ok" in line:
                # The first bytes naming the call: its record was written before them.
                assert "c_ok" in on_file(path)
                break
        else:
            raise AssertionError("the allowed call was not delivered")


@spies_on_internals
async def test_only_concurrent_streams_wait_to_share_an_audit_write(
    make_proxy, upstream, tmp_path, monkeypatch
):
    """A lone stream's call is written at once (no added latency); streams served together may
    wait up to delivery.STREAM_WINDOW for each other's records, to share one write."""
    proxy = await make_proxy({"audit": {"file": str(tmp_path / "audit.jsonl"), "log": False}})
    auditor = proxy.state.auditor
    windows: list[float] = []
    real = auditor.written

    async def spy(ctx: Any, window: float = 0.0) -> None:
        windows.append(window)
        await real(ctx, window)

    monkeypatch.setattr(auditor, "written", spy)
    url, body = request(proxy, "chat", True)
    upstream.push(SSE(chat_stream(("ok", {"a": 1}), ids=["c_ok"], text="Sure")))
    status, lines = await post(url, body)
    assert status == 200 and any(b"c_ok" in line for line in lines)
    assert windows and set(windows) == {0.0}

    windows.clear()
    slow = [SSE(chat_stream(("ok", {"a": i}), ids=[f"c{i}"]), delay=0.01) for i in range(3)]
    upstream.push(*slow)
    results = await asyncio.gather(*(post(url, body) for _ in range(3)))
    assert all(status == 200 for status, _ in results)
    assert any(w > 0 for w in windows)
