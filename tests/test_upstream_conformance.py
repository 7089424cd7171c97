"""Conformance with the OpenAI-compatible servers callgate is put in front of (issue 18).

What callgate writes upstream on a reprompt round must be accepted by every server kind, and a
reprompt round the upstream refuses never makes the client's answer worse.
"""

from __future__ import annotations

from typing import Any

from proxy import chat, responses


def test_assistant_turn_is_the_widely_accepted_form() -> None:
    # llama-cpp-python's own answer: content null, tool_calls and a mirrored function_call.
    args = '{"city": "Paris"}'
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    turn = chat.assistant_turn(None, [call], {"name": "get_weather", "arguments": args})
    assert turn == {"role": "assistant", "content": "", "tool_calls": [call]}


def test_assistant_turn_drops_nulls_and_keeps_extras() -> None:
    call: dict[str, Any] = {
        "id": "c1",
        "type": "function",
        "index": None,
        "function": {"name": "f", "arguments": {"a": 1}, "strict": None},
        "extra_content": {"google": {"thought_signature": "sig"}},
    }
    turn = chat.assistant_turn([{"type": "text", "text": "hi"}], [call])
    assert turn == {
        "role": "assistant",
        "content": "hi",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "f", "arguments": '{"a":1}'},
                "extra_content": {"google": {"thought_signature": "sig"}},
            }
        ],
    }


def test_arguments_that_are_no_json_object_go_as_empty_object() -> None:
    # vLLM json.loads them, Ollama unmarshals them into an object: anything else fails the request.
    for bad in ('{"a":', "", "[1]", '"x"', None):
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": bad}}
        assert chat.wire_call(call)["function"]["arguments"] == "{}", bad
    turn = chat.assistant_turn("", None, {"name": "f", "arguments": "nope"})
    assert turn == {
        "role": "assistant",
        "content": "",
        "function_call": {"name": "f", "arguments": "{}"},
    }


def test_replayed_response_items_carry_no_nulls() -> None:
    item = {
        "type": "message",
        "id": "m1",
        "status": None,
        "role": "assistant",
        "content": [{"type": "output_text", "text": "t", "logprobs": None, "annotations": []}],
    }
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "id": None}
    out = responses.replayable([item, call])
    assert out == [
        {
            "type": "message",
            "id": "m1",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "t", "annotations": []}],
        },
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ]
