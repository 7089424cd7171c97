"""Operating callgate: metrics, hot reload, SIGHUP, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.policy import load_policy
from proxy.reload import reload_policy, watch
from proxy.state import STATE
from tests.conftest import SSE, completion
from tests.streams import chat_stream

MSGS = [{"role": "user", "content": "hi"}]


async def test_metrics_after_known_decisions(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "tools": {"bad": {"allow": False}, "t": {"rate_limit": {"max_calls": 1, "window": 60}}},
        }
    )
    client = proxy.client()
    upstream.push(completion(("t", {})), completion(("t", {})), completion(("bad", {})))
    for _ in range(3):
        await client.chat.completions.create(model="m", messages=MSGS)
    async with aiohttp.ClientSession() as s, s.get(proxy.root + "/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200
    lines = set(text.splitlines())
    assert 'callgate_tool_call_decisions_total{gate="none",outcome="allowed",tool="t"} 1.0' in lines
    assert (
        'callgate_tool_call_decisions_total{gate="rate_limit",outcome="blocked",tool="t"} 1.0'
        in lines
    )
    assert (
        'callgate_tool_call_decisions_total{gate="rules",outcome="blocked",tool="bad"} 1.0' in lines
    )
    assert 'callgate_requests_total{route="chat.completions",status="200"} 3.0' in lines
    assert 'callgate_upstream_latency_seconds_count{route="chat.completions"} 3.0' in lines
    assert 'callgate_proxy_overhead_seconds_count{route="chat.completions"} 3.0' in lines


async def test_metrics_count_reprompts(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(completion(("bad", {})), completion(content="ok"))
    await proxy.client().chat.completions.create(model="m", messages=MSGS)
    text = proxy.state.metrics.exposition().decode()
    assert 'callgate_reprompt_rounds_total{route="chat.completions"} 1.0' in text


def write_policy(path: Path, tools: dict[str, Any], upstream_url: str) -> None:
    data = {"upstream": {"base_url": upstream_url}, "on_block": "error", "tools": tools}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    tmp.replace(path)


async def start_app(path: Path, aiohttp_server: Any) -> tuple[Any, Any]:
    app = create_app(load_policy(str(path)), config_path=str(path))
    server = await aiohttp_server(app, host="127.0.0.1")
    return server, app[STATE]


async def call_tool(url: str, upstream: Any, tool: str) -> bool:
    """True when the tool call came through, False when callgate blocked it."""
    upstream.push(completion((tool, {})))
    async with openai.AsyncOpenAI(base_url=url, api_key="sk-x", max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=MSGS)
        except openai.PermissionDeniedError:
            return False
    return True


async def test_reload_on_file_change_keeps_counters(tmp_path, aiohttp_server, upstream):
    path = tmp_path / "callgate.yaml"
    write_policy(path, {"t": {"rate_limit": {"max_calls": 2, "window": 3600}}}, upstream.url)
    server, state = await start_app(path, aiohttp_server)
    url = str(server.make_url("/v1"))
    assert await call_tool(url, upstream, "t")
    old = state.policy
    write_policy(
        path,
        {"t": {"rate_limit": {"max_calls": 2, "window": 3600}}, "bad": {"allow": False}},
        upstream.url,
    )
    assert await reload_policy(state, "test")
    assert state.policy is not old
    assert not await call_tool(url, upstream, "bad")
    assert await call_tool(url, upstream, "t")  # the second of two: the first survived reload
    assert not await call_tool(url, upstream, "t")


async def test_invalid_file_refused_old_policy_stays(tmp_path, aiohttp_server, upstream):
    path = tmp_path / "callgate.yaml"
    write_policy(path, {"bad": {"allow": False}}, upstream.url)
    server, state = await start_app(path, aiohttp_server)
    old = state.policy
    path.write_text("tools:\n  bad: {allow: maybe}\n")
    assert not await reload_policy(state, "test")
    assert state.policy is old
    assert not await call_tool(str(server.make_url("/v1")), upstream, "bad")
    assert 'callgate_policy_reloads_total{result="refused"} 1.0' in (
        state.metrics.exposition().decode()
    )


async def test_configmap_symlink_swap_is_watched(tmp_path, aiohttp_server, upstream):
    # The layout kubelet writes: file -> ..data/file, ..data -> a timestamped directory.
    v1, v2 = tmp_path / "..2026_01", tmp_path / "..2026_02"
    v1.mkdir()
    v2.mkdir()
    write_policy(v1 / "callgate.yaml", {}, upstream.url)
    write_policy(v2 / "callgate.yaml", {"bad": {"allow": False}}, upstream.url)
    (tmp_path / "..data").symlink_to(v1.name)
    path = tmp_path / "callgate.yaml"
    path.symlink_to("..data/callgate.yaml")
    server, state = await start_app(path, aiohttp_server)
    url = str(server.make_url("/v1"))
    assert await call_tool(url, upstream, "bad")
    task = asyncio.create_task(watch(state, interval=0.02))
    await asyncio.sleep(0.05)  # the watcher has seen the current file
    try:
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(v2.name)
        tmp_link.replace(tmp_path / "..data")  # atomic swap, as kubelet does
        for _ in range(250):  # bounded: 5 s
            if state.policy.tools.get("bad"):
                break
            await asyncio.sleep(0.02)
        assert not await call_tool(url, upstream, "bad")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(url: str, status: int = 200, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while loop.time() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url) as resp:
                    if resp.status == status:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {status}")


@pytest.fixture
async def serve_process(tmp_path):
    procs: list[asyncio.subprocess.Process] = []

    async def start(config: dict[str, Any]) -> tuple[asyncio.subprocess.Process, str, Path]:
        path = tmp_path / "callgate.yaml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "CALLGATE_UPSTREAM_URL"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
            "--port",
            str(port),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        procs.append(proc)
        root = f"http://127.0.0.1:{port}"
        await wait_http(root + "/healthz")
        return proc, root, path

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sighup_reloads(serve_process, upstream):
    proc, root, path = await serve_process(
        {
            "upstream": {"base_url": upstream.url},
            "on_block": "error",
            "server": {"reload_interval": 0},
        }
    )
    assert await call_tool(root + "/v1", upstream, "bad")
    write_policy(path, {"bad": {"allow": False}}, upstream.url)
    proc.send_signal(signal.SIGHUP)
    for _ in range(100):  # bounded: 5 s
        if not await call_tool(root + "/v1", upstream, "bad"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("SIGHUP did not reload the policy")


async def test_sigterm_finishes_stream_in_flight_and_flushes_audit(
    serve_process, upstream, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    proc, root, _ = await serve_process(
        {
            "upstream": {"base_url": upstream.url},
            "audit": {"file": str(audit), "log": False},
            "server": {"drain_delay": 0.5, "shutdown_grace": 10},
        }
    )
    slow = SSE(chat_stream(("t", {"a": 1}), text=" ".join(["w"] * 40)), delay=0.03)
    upstream.push(slow)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            root + "/v1/chat/completions", json={"model": "m", "messages": MSGS, "stream": True}
        )
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with s.get(root + "/readyz") as ready:  # draining: not ready, still serving
            assert ready.status == 503
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert b'"name":"t"' in rest
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    lines = audit.read_text().splitlines()
    assert len(lines) == 1 and '"decision":"allowed"' in lines[0]
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as s, s.get(root + "/healthz"):
            pass


async def test_request_in_flight_keeps_its_upstream_across_reload(
    tmp_path, aiohttp_server, upstream
):
    from proxy.reload import apply
    from tests.conftest import ScriptedUpstream

    other = ScriptedUpstream()
    app_b = web.Application()
    app_b.router.add_route("*", "/{tail:.*}", other.handle)
    server_b = await aiohttp_server(app_b, host="127.0.0.1")

    def policy_text(url: str) -> str:
        return yaml.safe_dump(
            {
                "upstream": {"base_url": url},
                "on_block": "reprompt",
                "tools": {"bad": {"allow": False}},
            }
        )

    path = tmp_path / "callgate.yaml"
    path.write_text(policy_text(upstream.url))
    server, state = await start_app(path, aiohttp_server)
    new_policy = tmp_path / "new.yaml"
    new_policy.write_text(policy_text(str(server_b.make_url("/v1"))))

    def first_round(_received: Any) -> dict[str, Any]:
        apply(state, load_policy(str(new_policy)))  # a reload lands mid-request
        return completion(("bad", {}))

    upstream.push(first_round, completion(content="answer after reprompt"))
    other.push(completion(content="new requests go here"))
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-x", max_retries=0
    ) as client:
        result = await client.chat.completions.create(model="m", messages=MSGS)
        assert result.choices[0].message.content == "answer after reprompt"
        assert len(upstream.received) == 2  # the reprompt round went where the request began
        later = await client.chat.completions.create(model="m", messages=MSGS)
    assert later.choices[0].message.content == "new requests go here"
