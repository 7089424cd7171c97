"""Bounded resources against a hostile or broken upstream (issue 19, item 5).

A fake upstream on 127.0.0.1 (aiohttp, or a raw asyncio server for a dripping head) sends:
- a gzip bomb (200 KiB inflating to 200 MiB), as a whole answer and inside an event stream,
  for Chat Completions and Responses: the client gets a 502 / an error event
  (`upstream_too_large`), never the tool call, while callgate's traced memory stays a few MiB;
  the bound is logged, counted on /metrics, and a held call is audited as blocked;
- answers at `upstream.max_response_bytes` exactly (plain and gzip) pass, one byte more fails;
  an ordinary compressed answer larger than the ratio's floor passes at the default ratio;
- an event stream that opens a tool call and then sends `: ping` every 50 ms for ever: the
  client (the real openai SDK) gets an `upstream_timeout` error event within
  `upstream.max_duration`, never the call, and callgate hangs up on the upstream;
- a non-streaming body, or a response head, dripping a byte every 50 ms: a 504;
- a reload that lowers a bound applies it to the next request, and the counter carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import random
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
import structlog
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.config import UpstreamConfig
from proxy.policy import load_policy
from proxy.reload import reload_policy
from proxy.state import STATE
from tests.conftest import completion, records
from tests.responses_streams import fc, msg, response, stream_events
from tests.streams import chat_stream

MSGS = [{"role": "user", "content": "hi"}]
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]
RESP_TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
]
BOMB_SIZE = 200 << 20  # decoded bytes of each bomb
MiB = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class BadUpstream:
    """Answers each request with the next scripted handler; notes when a handler ends."""

    handlers: list[Handler] = field(default_factory=list)
    url: str = ""
    ended: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        try:
            return await self.handlers.pop(0)(request)
        finally:
            self.ended.append(time.monotonic())


@pytest.fixture
async def bad(aiohttp_server: Any) -> BadUpstream:
    up = BadUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    up.url = str(server.make_url("/v1"))
    return up


def bomb(prefix: bytes, suffix: bytes) -> bytes:
    """gzip of prefix + BOMB_SIZE spaces (JSON whitespace) + suffix."""
    return b"".join(bomb_parts(prefix, suffix))


@functools.cache
def bomb_parts(prefix: bytes, suffix: bytes) -> tuple[bytes, bytes]:
    """The bomb in two parts: `prefix` (flushed: it decodes on its own), then the rest."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = z.compress(prefix) + z.flush(zlib.Z_SYNC_FLUSH)
    out = []
    pad = b" " * MiB
    for _ in range(BOMB_SIZE // MiB):
        out.append(z.compress(pad))
    out.append(z.compress(suffix))
    out.append(z.flush())
    return first, b"".join(out)


def split_at_pad(doc: bytes, marker: bytes = b"PAD") -> tuple[bytes, bytes]:
    head, _, tail = doc.partition(marker)
    return head, tail


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def body_reply(body: bytes, *, encoding: str | None = None, ctype: str = "application/json"):
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": ctype}
        if encoding:
            headers["Content-Encoding"] = encoding
        return web.Response(body=body, headers=headers)

    return handler


def stream_reply(head: bytes, then: bytes, encoding: str | None = None):
    """An event stream: `head`, a pause, then `then` (both already encoded as sent) in 64 KiB
    writes."""

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream"}
        if encoding:
            headers["Content-Encoding"] = encoding
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(head)
            await asyncio.sleep(0.1)  # the head is read (and a call opened) before the rest
            for start in range(0, len(then), 64 << 10):
                await resp.write(then[start : start + (64 << 10)])
            await resp.write_eof()
        return resp

    return handler


def pinging(head: list[bytes], interval: float = 0.05, most: float = 15.0):
    """Open a stream with `head`, then send `: ping` every `interval` until the reader leaves
    (or `most` seconds pass: bounded, so a failing test cannot leave it running)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for event in head:
                await resp.write(event)
            stop = time.monotonic() + most
            while time.monotonic() < stop:
                await asyncio.sleep(interval)
                await resp.write(b": ping\n\n")
        return resp

    return handler


def dripping(body: bytes, interval: float = 0.05):
    """A whole (Content-Length) answer sent one byte every `interval`: never silent for long."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for i in range(len(body)):
                await resp.write(body[i : i + 1])
                await asyncio.sleep(interval)
        return resp

    return handler


@contextlib.contextmanager
def traced_peak() -> Iterator[dict[str, int]]:
    """Peak Python memory allocated inside the block (bytes objects included), in bytes."""
    out: dict[str, int] = {}
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield out
        out["peak"] = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def chat_bomb_body() -> bytes:
    doc = json.dumps(completion(("get_weather", {"city": "Paris"}), content="PAD")).encode()
    return bomb(*split_at_pad(doc))


def responses_bomb_body() -> bytes:
    doc = json.dumps(response(msg("PAD"), fc("get_weather", {"city": "Paris"}, "c1"))).encode()
    return bomb(*split_at_pad(doc))


async def call_non_stream(client: openai.AsyncOpenAI, api: str) -> Any:
    if api == "chat":
        return await client.chat.completions.create(model="m", messages=MSGS, tools=CHAT_TOOLS)
    return await client.responses.create(model="m", input="hi", tools=RESP_TOOLS)


async def read_stream(client: openai.AsyncOpenAI, api: str) -> tuple[list[Any], BaseException]:
    """Every event the SDK yields until the stream fails; the failure."""
    seen: list[Any] = []
    if api == "chat":
        stream: Any = await client.chat.completions.create(
            model="m", messages=MSGS, tools=CHAT_TOOLS, stream=True
        )
    else:
        stream = await client.responses.create(model="m", input="hi", tools=RESP_TOOLS, stream=True)
    try:
        async for event in stream:
            seen.append(event)
    except openai.APIError as exc:
        return seen, exc
    raise AssertionError(f"the stream ended without an error after {len(seen)} events")


def calls_in(api: str, events: list[Any]) -> list[str]:
    """Tool calls the client was shown, by name."""
    names = []
    for ev in events:
        if api == "chat":
            for choice in ev.choices:
                for tc in choice.delta.tool_calls or []:
                    names.append(tc.function.name if tc.function else "")
        elif getattr(ev, "item", None) is not None and ev.item.type == "function_call":
            names.append(ev.item.name)
        elif ev.type.startswith("response.function_call_arguments"):
            names.append("(arguments)")
    return names


def held_call_events(api: str) -> list[bytes]:
    """The start of a stream with a tool call opened (arguments begun, not finished)."""
    if api == "chat":
        return [sse(e) for e in chat_stream(("get_weather", {"city": "Paris"}))[:3]]
    events = stream_events(response(fc("get_weather", {"city": "Paris"}, "c1")), piece=4)
    return events[:4]  # created, in_progress, output_item.added, one arguments delta


def bound_counts(proxy: Any) -> dict[str, int]:
    return {k[0]: v for k, v in proxy.state.upstream.bounds_exceeded.counts.items()}


API = pytest.mark.parametrize("api", ["chat", "responses"])


# -- size and ratio ------------------------------------------------------------------------


@API
async def test_gzip_bomb_non_stream_is_502_and_memory_stays_small(make_proxy, bad, api):
    body = chat_bomb_body() if api == "chat" else responses_bomb_body()
    assert len(body) < 256 << 10  # ~200 KiB on the wire for 200 MiB decoded
    proxy = await make_proxy({}, upstream_url=bad.url)
    seen = records(proxy)
    client = proxy.client()
    bad.handlers.append(body_reply(body, encoding="gzip"))
    with structlog.testing.capture_logs() as logs, traced_peak() as mem:
        with pytest.raises(openai.InternalServerError) as err:
            await call_non_stream(client, api)
    assert err.value.status_code == 502
    assert err.value.body["type"] == "upstream_error"
    assert err.value.body["code"] == "upstream_too_large"
    assert "max_decompression_ratio" in err.value.body["message"]
    # Cut off past the ratio's 1 MiB floor (plus one 16 KiB slice at 100x), not at 200 MiB.
    assert mem["peak"] < 24 * MiB, mem
    assert seen == []  # the answer was never read as JSON: no call decided, none delivered
    assert bound_counts(proxy) == {"max_decompression_ratio": 1}
    assert any(e["event"] == "upstream_bound_exceeded" for e in logs)
    async with aiohttp.ClientSession() as s, s.get(proxy.root + "/metrics") as r:
        text = await r.text()
    assert 'callgate_upstream_bounds_exceeded_total{bound="max_decompression_ratio"} 1.0' in text


@API
async def test_gzip_bomb_in_a_stream_fails_closed(make_proxy, bad, api):
    """A held call whose arguments are a bomb: an error event, the call audited as blocked."""
    if api == "chat":
        opened = held_call_events(api)
        piece = {
            **json.loads(opened[-1][6:]),
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "PAD"}}]},
                    "finish_reason": None,
                }
            ],
        }
        head, tail = split_at_pad(b"".join(opened) + sse(piece))
    else:
        opened = held_call_events(api)
        delta = {
            "type": "response.function_call_arguments.delta",
            "sequence_number": 4,
            "item_id": "fc_x",
            "output_index": 0,
            "delta": "PAD",
        }
        head, tail = split_at_pad(b"".join(opened) + sse(delta))
    first, rest = bomb_parts(head, tail)
    proxy = await make_proxy({}, upstream_url=bad.url)
    seen = records(proxy)
    client = proxy.client()
    bad.handlers.append(stream_reply(first, rest, encoding="gzip"))
    with structlog.testing.capture_logs() as logs, traced_peak() as mem:
        events, exc = await read_stream(client, api)
    assert isinstance(exc, openai.APIError)
    assert exc.body is not None and exc.body["code"] == "upstream_too_large"
    assert calls_in(api, events) == []
    assert mem["peak"] < 24 * MiB, mem
    assert [(r["tool"], r["decision"], r["reason"]) for r in seen] == [
        ("get_weather", "blocked", "upstream_too_large")
    ]
    failed = [e for e in logs if e["event"] == "stream_failed"]
    assert failed and failed[0]["code"] == "upstream_too_large"
    assert bound_counts(proxy) == {"max_decompression_ratio": 1}


@API
async def test_max_response_bytes_exactly_passes_one_more_fails(make_proxy, bad, api):
    limit = 1 * MiB
    if api == "chat":
        doc = json.dumps(completion(("get_weather", {"city": "Paris"}))).encode()
    else:
        doc = json.dumps(response(fc("get_weather", {"city": "Paris"}, "c1"))).encode()

    def padded(size: int) -> bytes:
        return doc[:-1] + b" " * (size - len(doc)) + b"}"

    # A high ratio: only the size bound is in play (spaces inflate ~1000x).
    config = {"upstream": {"max_response_bytes": limit, "max_decompression_ratio": 5000}}
    proxy = await make_proxy(config, upstream_url=bad.url)
    client = proxy.client()
    for encoding in (None, "gzip"):
        for size, ok in ((limit, True), (limit + 1, False)):
            body = padded(size)
            assert len(body) == size
            wire = gzip.compress(body) if encoding else body
            bad.handlers.append(body_reply(wire, encoding=encoding))
            if ok:
                answer = await call_non_stream(client, api)
                if api == "chat":
                    names = [c.function.name for c in answer.choices[0].message.tool_calls]
                else:
                    names = [o.name for o in answer.output if o.type == "function_call"]
                assert names == ["get_weather"], (encoding, size)
            else:
                with pytest.raises(openai.InternalServerError) as err:
                    await call_non_stream(client, api)
                assert err.value.status_code == 502
                assert err.value.body["code"] == "upstream_too_large"
                assert "max_response_bytes" in err.value.body["message"]
    assert bound_counts(proxy) == {"max_response_bytes": 2}


async def test_stream_total_is_bounded_by_max_response_bytes(make_proxy, bad):
    """A stream's decoded total counts, even in small events that are never held."""
    config = {"upstream": {"max_response_bytes": 64 << 10}}
    proxy = await make_proxy(config, upstream_url=bad.url)
    seen = records(proxy)
    text = " ".join(["word"] * 8000)  # ~40 bytes of JSON an event: past 64 KiB in events
    events = [sse(e) for e in chat_stream(text=text)]
    bad.handlers.append(stream_reply(b"".join(events[:2]), b"".join(events[2:])))
    got, exc = await read_stream(proxy.client(), "chat")
    assert exc.body is not None and exc.body["code"] == "upstream_too_large"
    assert 0 < len(got) < 8000
    assert seen == []


async def test_ordinary_compressed_answer_passes_default_ratio(make_proxy, bad):
    """Past the ratio's floor, an ordinary JSON answer (~3 MiB, varied text) inflates well
    under 100x: the default ratio does not refuse it."""
    rng = random.Random(7)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    content = " ".join(rng.choice(words) for _ in range(500_000))
    doc = json.dumps(completion(("get_weather", {"city": "Paris"}), content=content)).encode()
    wire = gzip.compress(doc)
    assert len(doc) > 3 * MiB and len(doc) / len(wire) < 100
    proxy = await make_proxy({}, upstream_url=bad.url)
    bad.handlers.append(body_reply(wire, encoding="gzip"))
    answer = await call_non_stream(proxy.client(), "chat")
    assert answer.choices[0].message.content == content
    assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert bound_counts(proxy) == {}


# -- duration ------------------------------------------------------------------------------


@API
async def test_keepalive_comments_cannot_hold_a_call_past_max_duration(make_proxy, bad, api):
    # The silence timeout (0.3 s) alone never fires: a ping comes every 50 ms.
    config = {"upstream": {"timeout": 0.3, "max_duration": 1}}
    proxy = await make_proxy(config, upstream_url=bad.url)
    seen = records(proxy)
    client = proxy.client(timeout=10.0)
    bad.handlers.append(pinging(held_call_events(api)))
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        events, exc = await asyncio.wait_for(read_stream(client, api), 10)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert exc.body is not None and exc.body["code"] == "upstream_timeout"
    assert "max_duration" in str(exc.body["message"])
    assert calls_in(api, events) == []  # the held call is never delivered
    assert [(r["tool"], r["decision"], r["reason"]) for r in seen] == [
        ("get_weather", "blocked", "upstream_timeout")
    ]
    assert any(e["event"] == "stream_failed" and e["code"] == "upstream_timeout" for e in logs)
    assert bound_counts(proxy) == {"max_duration": 1}
    # callgate hung up on the upstream: its pinging ends soon after (not at its 15 s bound).
    for _ in range(100):
        if bad.ended:
            break
        await asyncio.sleep(0.05)
    assert bad.ended and bad.ended[0] - started < 6.0


@API
async def test_dripping_body_is_504(make_proxy, bad, api):
    if api == "chat":
        body = json.dumps(completion(("get_weather", {"city": "Paris"}))).encode()
    else:
        body = json.dumps(response(fc("get_weather", {"city": "Paris"}, "c1"))).encode()
    config = {"upstream": {"timeout": 0.3, "max_duration": 1}}
    proxy = await make_proxy(config, upstream_url=bad.url)
    bad.handlers.append(dripping(body))  # ~15 s to send it all, never 0.3 s silent
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        await asyncio.wait_for(call_non_stream(proxy.client(timeout=10.0), api), 10)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert err.value.status_code == 504
    assert err.value.body["type"] == "upstream_error"
    assert err.value.body["code"] == "upstream_timeout"
    assert "max_duration" in err.value.body["message"]
    assert bound_counts(proxy) == {"max_duration": 1}


async def test_dripping_head_is_504(make_proxy):
    """The deadline runs from the request sent: a head dripping a byte at a time counts."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Pad: " + b"a" * 200

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            for i in range(len(head)):
                writer.write(head[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = {"upstream": {"timeout": 0.3, "max_duration": 1}}
        proxy = await make_proxy(config, upstream_url=f"http://127.0.0.1:{port}/v1")
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            await asyncio.wait_for(call_non_stream(proxy.client(timeout=10.0), "chat"), 10)
        assert time.monotonic() - started < 3.0
        assert err.value.status_code == 504
        assert err.value.body["code"] == "upstream_timeout"
        assert "max_duration" in err.value.body["message"]
    finally:
        server.close()
        await server.wait_closed()


async def test_settings_parse_and_default():
    default = UpstreamConfig()
    assert default.max_response_bytes == 64 * MiB
    assert default.max_decompression_ratio == 100
    assert default.max_duration == 1800
    assert UpstreamConfig(max_duration="45m").max_duration == 2700
    with pytest.raises(ValueError):
        UpstreamConfig(max_decompression_ratio=0.5)
    with pytest.raises(ValueError):
        UpstreamConfig(max_duration=0)


async def test_reload_applies_new_bounds_to_new_requests(tmp_path, aiohttp_server, bad):
    path = tmp_path / "callgate.yaml"

    def write(max_bytes: int) -> None:
        data = {"upstream": {"base_url": bad.url, "max_response_bytes": max_bytes}}
        path.write_text(yaml.safe_dump(data))

    write(4 * MiB)
    app = create_app(load_policy(str(path)), config_path=str(path))
    server = await aiohttp_server(app, host="127.0.0.1")
    state = app[STATE]
    doc = json.dumps(completion(("get_weather", {"city": "Paris"}))).encode()
    body = doc[:-1] + b" " * (64 << 10) + b"}"
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-x", max_retries=0
    ) as client:
        bad.handlers.append(body_reply(body))
        assert (await call_non_stream(client, "chat")).choices[0].message.tool_calls
        write(32 << 10)
        assert await reload_policy(state, "test")
        bad.handlers.append(body_reply(body))
        with pytest.raises(openai.InternalServerError) as err:
            await call_non_stream(client, "chat")
    assert err.value.body["code"] == "upstream_too_large"
    assert "32768 bytes" in err.value.body["message"]
    # The counter registered at start is the one counting after the reload.
    assert state.upstream.bounds_exceeded.counts == {("max_response_bytes",): 1}
    assert 'callgate_upstream_bounds_exceeded_total{bound="max_response_bytes"} 1.0' in (
        state.metrics.exposition().decode()
    )
