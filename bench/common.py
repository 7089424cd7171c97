"""Shared pieces of the load benchmark: the payloads, the event loop choice, process helpers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable

import orjson

# The tool the mock model calls, allowed by the benchmark's policy (its rule does not match).
TOOL = "search_web"
TOOL_ARGS = orjson.dumps(
    {
        "query": "latest benchmark results for reverse proxies written in Python with aiohttp",
        "max_results": 5,
        "recency_days": 30,
    }
).decode()


def chat_request(stream: bool) -> bytes:
    """A typical agent request (~1 KB): system + user turn, two tools."""
    body: dict[str, object] = {
        "model": "gpt-4o-mini",
        "messages": [
            {
                "role": "system",
                "content": "You are a research assistant. Use the tools to find current facts "
                "and cite your sources. Keep answers short.",
            },
            {"role": "user", "content": "What are the latest reverse proxy benchmark results?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": TOOL,
                    "description": "Search the web and return the top results.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "query": {"type": "string"},
                            "max_results": {"type": "integer"},
                            "recency_days": {"type": "integer"},
                        },
                        "required": ["query"],
                    },
                },
            },
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            },
        ],
        "tool_choice": "auto",
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def _completion() -> bytes:
    """A ~1 KB `chat.completion` with one tool call, shaped like OpenAI's."""
    return orjson.dumps(
        {
            "id": "chatcmpl-BENCH0123456789abcdefghijklmnopq",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_bench0123456789abcdefgh",
                                "type": "function",
                                "function": {"name": TOOL, "arguments": TOOL_ARGS},
                            }
                        ],
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {
                "prompt_tokens": 187,
                "completion_tokens": 31,
                "total_tokens": 218,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_0123456789",
            "metadata": {"note": "callgate benchmark mock " + "x" * 126},
        }
    )


COMPLETION = _completion()

STREAM_CHUNKS = 20


_CHUNK_BASE = {
    "id": "chatcmpl-BENCH0123456789abcdefghijklmnopq",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_0123456789",
}


def stream_event(delta: dict[str, object], finish: str | None = None) -> bytes:
    """One `chat.completion.chunk` event of choice 0, as the mock upstream writes it."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return b"data: " + orjson.dumps({**_CHUNK_BASE, "choices": [choice]}) + b"\n\n"


def _stream() -> list[bytes]:
    """20 `chat.completion.chunk` events: role, 12 text deltas, a tool call (its header and 5
    argument pieces), `finish_reason`; then `[DONE]` (a 21st event)."""
    event = stream_event
    words = "Let me look that up for you: I will search the web for the latest results .".split()
    events = [event({"role": "assistant", "content": "", "refusal": None})]
    events += [event({"content": w + " "}) for w in words[:12]]
    events.append(
        event(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_bench0123456789abcdefgh",
                        "type": "function",
                        "function": {"name": TOOL, "arguments": ""},
                    }
                ]
            }
        )
    )
    step = -(-len(TOOL_ARGS) // 5)
    for i in range(5):
        piece = TOOL_ARGS[i * step : (i + 1) * step]
        events.append(event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    events.append(event({}, "tool_calls"))
    assert len(events) == STREAM_CHUNKS
    return [*events, b"data: [DONE]\n\n"]


STREAM = _stream()

# Headers the real API sends with every answer (proxies copy them through).
UPSTREAM_HEADERS = {
    "x-request-id": "req_0123456789abcdef0123456789abcdef",
    "openai-processing-ms": "412",
    "openai-version": "2020-10-01",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(main: Callable[[], Awaitable[None]], loop: str) -> None:
    """Run `main()` on asyncio's default loop or on uvloop."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def until_signalled() -> None:
    """Wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
