"""Slow and greedy clients: request-head timeout, idle timeout, and the connection bound.

callgate runs on 127.0.0.1 through `proxy.server.make_runner` (what `callgate serve` uses),
with short timeouts; the clients are raw sockets. Counts and waits are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.config import ConfigError
from proxy.http_guard import GuardedAppRunner
from proxy.policy import load_policy_text
from proxy.server import make_runner
from tests.conftest import ScriptedUpstream, completion, policy_from
from tests.native_pass import proxy_cli
from tests.test_operations import free_port, wait_http

PARTIAL_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Authorization: Bearer sk-slowloris\r\nContent-Ty"
)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

Start = Callable[..., Awaitable[tuple[int, GuardedAppRunner]]]


@pytest.fixture
async def start(upstream: ScriptedUpstream) -> AsyncIterator[Start]:
    runners: list[GuardedAppRunner] = []

    async def start(**server: Any) -> tuple[int, GuardedAppRunner]:
        policy = policy_from({"server": server}, upstream.url)
        runner = make_runner(create_app(policy), policy.config.server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return runner.addresses[0][1], runner

    yield start
    for runner in runners:
        await runner.cleanup()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    data = bytearray()

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data.extend(chunk)

    await asyncio.wait_for(read(), timeout)
    return bytes(data)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response framed by Content-Length (the connection stays open)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines) if k.lower() == "content-length"
    )
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 5)


def error_of(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return int(head.split()[1]), error


async def timed_close(
    port: int, send: Callable[[asyncio.StreamWriter], Awaitable[None]]
) -> tuple[float, bytes]:
    """Connect, let `send` write, then how long until callgate closed, and what it sent."""
    loop = asyncio.get_running_loop()
    # From before the connect: callgate's timer starts at its accept, which a busy loop may
    # let come well before this coroutine resumes (200 connections open at once).
    began = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sending = asyncio.ensure_future(send(writer))
        data = await read_until_closed(reader, 10)
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        return loop.time() - began, data
    finally:
        writer.close()


async def test_half_open_heads_are_closed_after_the_header_timeout(start: Start) -> None:
    port, runner = await start(header_timeout=0.5, idle_timeout=30, max_connections=1000)

    async def partial(writer: asyncio.StreamWriter) -> None:
        writer.write(PARTIAL_HEAD)

    async def trickle(writer: asyncio.StreamWriter) -> None:
        # A byte every 50 ms: every read is progress, but the head never ends.
        for byte in PARTIAL_HEAD:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    results = await asyncio.gather(
        *(timed_close(port, partial) for _ in range(200)),
        *(timed_close(port, trickle) for _ in range(5)),
    )
    for elapsed, raw in results:
        assert 0.4 <= elapsed <= 2.5, elapsed
        status, error = error_of(raw)
        assert status == 408 and error["code"] == "request_timeout"
    assert runner.guard.head_timeouts == 205
    for _ in range(100):
        if runner.guard.active == 0:
            break
        await asyncio.sleep(0.02)
    assert runner.guard.active == 0


async def test_a_silent_connection_is_closed_without_an_answer(start: Start) -> None:
    port, _ = await start(header_timeout=0.3, idle_timeout=30)

    async def nothing(writer: asyncio.StreamWriter) -> None:
        pass

    elapsed, raw = await timed_close(port, nothing)
    assert 0.25 <= elapsed <= 2 and raw == b""


async def test_a_complete_head_is_not_cut_and_its_slow_successor_is(
    start: Start, upstream: ScriptedUpstream
) -> None:
    """The head timer runs per request head, from its first byte; it never limits a body or
    the time between requests."""
    port, _ = await start(header_timeout=0.4, idle_timeout=30)
    upstream.push(completion(content="hi"))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # A head in pieces, finished within the timeout, is served.
        writer.write(HEALTHZ[:10])
        await asyncio.sleep(0.2)
        writer.write(HEALTHZ[10:])
        assert (await read_response(reader))[0] == 200
        # A body slower than the head timeout is not cut.
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]
        )
        await asyncio.sleep(0.6)
        writer.write(body[10:])
        status, answer = await read_response(reader)
        assert status == 200, answer
        assert json.loads(answer)["choices"][0]["message"]["content"] == "hi"
        # Idle past the head timeout: still open (that is the idle timeout's business).
        await asyncio.sleep(0.6)
        writer.write(HEALTHZ)
        assert (await read_response(reader))[0] == 200
        # The next head starts and stalls: cut after the head timeout.
        loop = asyncio.get_running_loop()
        began = loop.time()
        writer.write(HEALTHZ[:10])
        raw = await read_until_closed(reader, 5)
        assert 0.3 <= loop.time() - began <= 2
        assert error_of(raw)[0] == 408
    finally:
        writer.close()


async def test_an_idle_keepalive_connection_is_closed_after_the_idle_timeout(start: Start) -> None:
    port, _ = await start(header_timeout=0.3, idle_timeout=1.0)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEALTHZ)
        assert (await read_response(reader))[0] == 200
        began = loop.time()
        raw = await read_until_closed(reader, 5)
        assert 0.9 <= loop.time() - began <= 2.5
        assert raw == b""  # an idle close says nothing: no response to misread
    finally:
        writer.close()


async def test_past_the_bound_new_connections_get_503_and_open_ones_are_served(
    start: Start,
) -> None:
    port, runner = await start(header_timeout=5, idle_timeout=30, max_connections=5)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    try:
        for reader, writer in held:
            writer.write(HEALTHZ)
            assert (await read_response(reader))[0] == 200
        assert runner.guard.active == 5

        # Over the bound: 503 in OpenAI's shape (retryable), then closed.
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEALTHZ)
            raw = await read_until_closed(reader, 5)
            writer.close()
            status, error = error_of(raw)
            assert status == 503 and error["code"] == "too_many_connections"
            assert b"retry-after: 1" in raw.lower()
        assert runner.guard.refused == 3 and runner.guard.active == 5

        # The open connections are served as before.
        for reader, writer in held:
            writer.write(HEALTHZ)
            assert (await read_response(reader))[0] == 200

        # A freed slot admits the next connection.
        _, first = held.pop(0)
        first.close()
        for _ in range(100):
            if runner.guard.active == 4:
                break
            await asyncio.sleep(0.02)
        assert runner.guard.active == 4
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append((reader, writer))
        writer.write(HEALTHZ)
        assert (await read_response(reader))[0] == 200
    finally:
        for _, writer in held:
            writer.close()


def test_settings_parse_and_are_validated() -> None:
    text = yaml.safe_dump(
        {"server": {"header_timeout": "2s", "idle_timeout": "1m", "max_connections": 64}}
    )
    server = load_policy_text(text, "<test>").config.server
    assert (server.header_timeout, server.idle_timeout, server.max_connections) == (2, 60, 64)
    defaults = load_policy_text("{}", "<test>").config.server
    assert (defaults.header_timeout, defaults.idle_timeout, defaults.max_connections) == (
        10,
        75,
        10_000,
    )
    for bad in ({"header_timeout": 0}, {"idle_timeout": "0s"}, {"max_connections": 0}):
        with pytest.raises(ConfigError):
            load_policy_text(yaml.safe_dump({"server": bad}), "<test>")


async def test_callgate_serve_applies_the_settings(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "callgate.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstream": {"base_url": upstream.url},
                "server": {"header_timeout": 0.5, "max_connections": 25, "shutdown_grace": 1},
            }
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CALLGATE_UPSTREAM_URL"}
    proc = await asyncio.create_subprocess_exec(
        *proxy_cli(), "serve", "--config", str(path), "--port", str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz")

        async def partial(writer: asyncio.StreamWriter) -> None:
            writer.write(PARTIAL_HEAD)

        results = await asyncio.gather(*(timed_close(port, partial) for _ in range(20)))
        for elapsed, raw in results:
            assert 0.4 <= elapsed <= 3, elapsed
            assert error_of(raw)[0] == 408

        # The bound, on uvloop (`callgate serve` runs it): the 26th connection gets a 503.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(25)]
        try:
            for reader, writer in held:
                writer.write(HEALTHZ)
                assert (await read_response(reader))[0] == 200
            elapsed, raw = await timed_close(port, partial)
            assert error_of(raw)[0] == 503
            reader, writer = held[0]
            writer.write(HEALTHZ)
            assert (await read_response(reader))[0] == 200
        finally:
            for _, writer in held:
                writer.close()
    finally:
        proc.terminate()
        await proc.wait()
