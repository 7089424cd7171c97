"""Builders for scripted Chat Completions streams, shaped like OpenAI's."""

from __future__ import annotations

import json
from typing import Any

BASE = {
    "id": "chatcmpl-stream",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "gpt-test",
    "system_fingerprint": "fp_test",
}


def chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> dict[str, Any]:
    out = {
        **BASE,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        out["usage"] = None
    return out


def chat_stream(
    *calls: tuple[str, Any],
    text: str | None = None,
    ids: list[str] | None = None,
    arg_piece: int = 7,
    include_usage: bool = False,
    finish: str | None = None,
) -> list[dict[str, Any]]:
    """Role chunk, text word by word, each call's arguments in pieces, finish, optional usage."""
    events = [
        chunk(
            {"role": "assistant", "content": "" if text else None, "refusal": None},
            usage=include_usage,
        )
    ]
    if text:
        for word in text.split(" "):
            events.append(chunk({"content": word + " "}, usage=include_usage))
    for i, (name, args) in enumerate(calls):
        arguments = args if isinstance(args, str) else json.dumps(args)
        call_id = ids[i] if ids else f"call_{name}_{i}"
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                },
                usage=include_usage,
            )
        )
        for start in range(0, len(arguments), arg_piece):
            piece = arguments[start : start + arg_piece]
            events.append(
                chunk(
                    {"tool_calls": [{"index": i, "function": {"arguments": piece}}]},
                    usage=include_usage,
                )
            )
    events.append(chunk({}, finish or ("tool_calls" if calls else "stop"), usage=include_usage))
    if include_usage:
        events.append(
            {
                **BASE,
                "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )
    return events
