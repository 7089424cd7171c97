"""Conformance with the OpenAI-compatible servers callgate is put in front of (issue 18).

What callgate writes upstream on a reprompt round must be accepted by every server kind, and a
reprompt round the upstream refuses never makes the client's answer worse.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy import chat, responses
from tests.conftest import SSE, completion, records
from tests.responses_streams import FakeResponses, fc, msg, response, sse_event
from tests.streams import chat_stream, chunk

RTOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("get_weather", "delete_file")
]


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


# -- a reprompt round the upstream fails: the client gets the strip answer ------------------

DENY = {"tools": {"delete_file": {"allow": False}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
BLOCKED = ("delete_file", {"path": "/"})


def _error(status: int) -> web.Response:
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    return web.json_response(body, status=status)


def _failures(proxy: Any, route: str, status: str) -> float | None:
    return proxy.state.metrics.registry.get_sample_value(
        "callgate_reprompt_failures_total", {"route": route, "status": status}
    )


def _check_failed_record(seen: list[dict[str, Any]], status: str) -> None:
    assert [(r["tool"], r["decision"], r["action"]) for r in seen] == [
        ("delete_file", "blocked", "reprompt_failed")
    ]
    assert seen[0]["upstream_status"] == status


FAILURES = [
    (lambda: _error(500), "500"),
    (lambda: _error(400), "400"),
    (
        lambda: web.Response(body=b"<html>bad gateway</html>", content_type="application/json"),
        "malformed",
    ),
    (lambda: web.json_response({"object": "chat.completion"}), "malformed"),
]


@pytest.mark.parametrize(("reply", "status"), FAILURES)
async def test_chat_reprompt_failure_answers_as_strip(make_proxy, upstream, reply, status):
    proxy = await make_proxy(DENY)
    seen = records(proxy)
    upstream.push(completion(BLOCKED, content="Deleting."), lambda _: reply())
    # Retries on: a 5xx would make the SDK send the whole request again.
    client = proxy.client().with_options(max_retries=2)
    result = await client.chat.completions.create(model="m", messages=MSGS)
    message = result.choices[0].message
    assert message.tool_calls is None and result.choices[0].finish_reason == "stop"
    assert message.content.startswith("Deleting.\n\n[callgate] blocked tool call: delete_file")
    assert len(upstream.bodies()) == 2  # the round, its reprompt; no retry
    _check_failed_record(seen, status)
    assert _failures(proxy, "chat.completions", status) == 1


async def test_chat_reprompt_timeout_answers_as_strip(make_proxy, upstream):
    proxy = await make_proxy({**DENY, "upstream": {"timeout": 0.3}})
    seen = records(proxy)

    async def slow(received: Any) -> dict[str, Any]:
        await asyncio.sleep(1.0)
        return completion(content="too late")

    upstream.push(completion(BLOCKED), slow)
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.content.startswith("[callgate] blocked tool call")
    _check_failed_record(seen, "timeout")


STREAM_FAILURES = [
    (lambda: _error(500), "500"),
    (lambda: SSE([b"data: {not json\n\n"]), "malformed"),
    (lambda: SSE([{"error": {"message": "model crashed", "type": "server_error"}}]), "error_event"),
    (lambda: SSE([chunk({"role": "assistant", "content": None})], done=False), "malformed"),
]


@pytest.mark.parametrize(("reply", "status"), STREAM_FAILURES)
async def test_chat_stream_reprompt_failure_ends_as_strip(make_proxy, upstream, reply, status):
    proxy = await make_proxy(DENY)
    seen = records(proxy)
    upstream.push(SSE(chat_stream(BLOCKED, text="Deleting it.")), lambda _: reply())
    client = proxy.client()
    stream = await client.chat.completions.create(
        model="m", messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = "", None, None
    async for event in stream:  # an error event would raise APIError here
        usage = event.usage or usage
        for choice in event.choices:
            assert not choice.delta.tool_calls
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text.startswith("Deleting it. \n\n[callgate] blocked tool call: delete_file")
    assert finish == "stop"
    assert usage is None  # the scripted round reported none
    _check_failed_record(seen, status)
    assert _failures(proxy, "chat.completions", status) == 1


async def test_chat_stream_reprompt_failure_with_the_stream_helper(make_proxy, upstream):
    proxy = await make_proxy(DENY)
    upstream.push(SSE(chat_stream(BLOCKED)), lambda _: _error(500))
    async with proxy.client().chat.completions.stream(model="m", messages=MSGS) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.tool_calls in (None, [])
    assert final.choices[0].message.content.startswith("[callgate] blocked tool call")


async def test_responses_reprompt_failure_answers_as_strip(make_proxy, upstream):
    proxy = await make_proxy(DENY)
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(
        api.reply(response(msg("Deleting."), fc("delete_file", {"path": "/"}, "c1"))),
        lambda _: _error(503),
    )
    result = (
        await proxy.client()
        .with_options(max_retries=2)
        .responses.create(model="m", input="hi", tools=RTOOLS)
    )
    assert [o.type for o in result.output] == ["message", "message"]
    assert "[callgate] blocked tool call: delete_file" in result.output_text
    assert len(upstream.bodies("/v1/responses")) == 2
    _check_failed_record(seen, "503")
    assert _failures(proxy, "responses", "503") == 1
    # The next turn continues the response the client saw; the upstream gets the error output.
    upstream.push(api.reply(response(msg("Ok."))))
    nxt = await proxy.client().responses.create(
        model="m", input="fine", previous_response_id=result.id, tools=RTOOLS
    )
    assert nxt.output_text == "Ok."
    sent = upstream.bodies("/v1/responses")[-1]["input"]
    assert sent[0]["type"] == "function_call_output" and sent[0]["call_id"] == "c1"


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (lambda: _error(500), "500"),
        (
            lambda: SSE([sse_event({"type": "error", "code": "x", "message": "boom"})]),
            "error_event",
        ),
        (lambda: SSE([b": keep-alive\n\n"], done=False), "malformed"),  # truncated
    ],
)
async def test_responses_stream_reprompt_failure_ends_as_strip(make_proxy, upstream, reply, status):
    proxy = await make_proxy(DENY)
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(
        api.reply(response(msg("Deleting."), fc("delete_file", {"path": "/"}, "c1"))),
        lambda _: reply(),
    )
    client = proxy.client()
    async with client.responses.stream(model="m", input="hi", tools=RTOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [o.type for o in final.output] == ["message", "message"]
    assert "[callgate] blocked tool call: delete_file" in final.output_text
    _check_failed_record(seen, status)
    assert _failures(proxy, "responses", status) == 1


# -- tool_choice on reprompt rounds ------------------------------------------------------------


def _fn(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


CHAT_TOOLS = [_fn("get_weather"), _fn("delete_file")]
NEVER = {"delete_file"}.__contains__  # what the policy never allows


@pytest.mark.parametrize(
    ("tools", "choice", "relaxed"),
    [
        (CHAT_TOOLS, {"type": "function", "function": {"name": "delete_file"}}, "auto"),
        (CHAT_TOOLS, "required", "auto"),
        ([_fn("delete_file")], "required", "none"),
        ([_fn("delete_file")], {"type": "function", "function": {"name": "delete_file"}}, "none"),
        (CHAT_TOOLS, "auto", None),  # nothing forced: left alone
        (CHAT_TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None),
        (
            CHAT_TOOLS,
            {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "required", "tools": CHAT_TOOLS},
            },
            {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": CHAT_TOOLS},
            },
        ),
        (
            CHAT_TOOLS,
            {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "required", "tools": [_fn("delete_file")]},
            },
            "none",
        ),
    ],
)
def test_chat_tool_choice_relaxed(tools: Any, choice: Any, relaxed: Any) -> None:
    body = {"tools": tools, "tool_choice": choice}
    got = chat.relaxed_tool_choice(body, {"delete_file"}, NEVER)
    assert got == ({} if relaxed is None else {"tool_choice": relaxed})
    assert body["tool_choice"] == choice  # the client's request is not changed


def test_chat_legacy_function_call_relaxed() -> None:
    body = {"functions": [{"name": "delete_file"}], "function_call": {"name": "delete_file"}}
    assert chat.relaxed_tool_choice(body, {"delete_file"}, NEVER) == {"function_call": "none"}
    body["functions"].append({"name": "get_weather"})
    assert chat.relaxed_tool_choice(body, {"delete_file"}, NEVER) == {"function_call": "auto"}


def test_chat_tool_choice_none_when_every_other_tool_is_denied() -> None:
    # get_weather was blocked (say, by its rate limit); delete_file is never allowed.
    body = {"tools": CHAT_TOOLS, "tool_choice": "required"}
    assert chat.relaxed_tool_choice(body, {"get_weather"}, NEVER) == {"tool_choice": "none"}


@pytest.mark.parametrize(
    ("choice", "relaxed"),
    [
        ("required", "auto"),
        ({"type": "function", "name": "delete_file"}, "auto"),
        ({"type": "function", "name": "get_weather"}, None),
        ({"type": "allowed_tools", "mode": "required", "tools": RTOOLS}, "allowed-auto"),
        (
            {"type": "allowed_tools", "mode": "required", "tools": [RTOOLS[1]]},
            "none",
        ),
        ({"type": "allowed_tools", "mode": "auto", "tools": RTOOLS}, None),
    ],
)
def test_responses_tool_choice_relaxed(choice: Any, relaxed: Any) -> None:
    body = {"tools": RTOOLS, "tool_choice": choice}
    got = responses.relaxed_tool_choice(body, {"delete_file"}, NEVER)
    if relaxed is None:
        assert got == {}
    elif relaxed == "allowed-auto":
        assert got == {"tool_choice": {**choice, "mode": "auto"}}
    else:
        assert got == {"tool_choice": relaxed}
    only = {"tools": [RTOOLS[1]], "tool_choice": "required"}
    assert responses.relaxed_tool_choice(only, {"delete_file"}, NEVER) == {"tool_choice": "none"}
    shell = {"tools": [{"type": "shell"}], "tool_choice": {"type": "shell"}}
    assert responses.relaxed_tool_choice(shell, {"shell"}, NEVER) == {"tool_choice": "none"}


FORCE_DELETE = {"type": "function", "function": {"name": "delete_file"}}


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_reprompt_round_does_not_force_the_blocked_tool(make_proxy, upstream, stream):
    proxy = await make_proxy(DENY)
    first = SSE(chat_stream(BLOCKED)) if stream else completion(BLOCKED)
    answer = (
        SSE(chat_stream(text="I may not delete files."))
        if stream
        else completion(content="I may not delete files.")
    )
    upstream.push(first, answer)
    client = proxy.client()
    kw: dict[str, Any] = {"tools": CHAT_TOOLS, "tool_choice": FORCE_DELETE}
    if stream:
        async with client.chat.completions.stream(model="m", messages=MSGS, **kw) as s:
            final = await s.get_final_completion()
    else:
        final = await client.chat.completions.create(model="m", messages=MSGS, **kw)
    assert final.choices[0].message.content.strip() == "I may not delete files."
    first_body, second_body = upstream.bodies()
    assert first_body["tool_choice"] == FORCE_DELETE
    assert second_body["tool_choice"] == "auto"
    assert second_body["tools"] == CHAT_TOOLS


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_reprompt_round_does_not_force_the_blocked_tool(
    make_proxy, upstream, stream
):
    proxy = await make_proxy(DENY)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("delete_file", {"path": "/"}, "c1"))),
        api.reply(response(msg("I may not delete files."))),
    )
    client = proxy.client()
    kw: dict[str, Any] = {"tools": RTOOLS, "tool_choice": "required"}
    if stream:
        async with client.responses.stream(model="m", input="hi", **kw) as s:
            final = await s.get_final_response()
    else:
        final = await client.responses.create(model="m", input="hi", **kw)
    assert final.output_text == "I may not delete files."
    first_body, second_body = upstream.bodies("/v1/responses")
    assert first_body["tool_choice"] == "required"
    assert second_body["tool_choice"] == "auto"


# -- server kinds: each enforces its request schema and answers in its recorded shapes -------

DATA = Path(__file__).parent / "data" / "upstreams"
LCP = DATA / "llama-cpp-python-0.3.36"
LLAMA_SERVER = DATA / "llama-server-b11434"
WEATHER_ARGS = '{"city": "Paris", "unit": "celsius"}'
DENY_WEATHER = {"tools": {"get_weather": {"allow": False}}}
KIND_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": n,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for n in ("get_weather", "delete_file")
]
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _problem_openai(body: dict[str, Any]) -> str | None:
    """OpenAI's reference: content may be null or left out beside tool_calls; every tool call
    is answered by a tool message right after its assistant turn, and only those are."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return "messages: not an array"
    open_calls: list[str] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}].role: {role!r}"
        if role == "tool":
            if m.get("tool_call_id") not in open_calls:
                return f"messages[{i}]: a tool message answers no tool call before it"
            open_calls.remove(m["tool_call_id"])
            if not isinstance(m.get("content"), str | list):
                return f"messages[{i}].content: expected a string"
            continue
        if open_calls:
            return f"tool_calls must be followed by tool messages; missing: {open_calls}"
        if role == "assistant":
            calls = m.get("tool_calls")
            if m.get("content") is None and not calls and not m.get("function_call"):
                return f"messages[{i}].content: required without tool_calls"
            for c in calls or []:
                fn = c.get("function") or {}
                if not isinstance(c.get("id"), str) or not isinstance(fn.get("arguments"), str):
                    return f"messages[{i}].tool_calls: id and arguments must be strings"
                open_calls.append(c["id"])
        elif not isinstance(m.get("content"), str | list):
            return f"messages[{i}].content: expected a string or an array"
    if open_calls:
        return f"tool_calls without tool messages: {open_calls}"
    choice = body.get("tool_choice")
    if choice is not None:
        if not body.get("tools"):
            return "tool_choice is only allowed when tools are specified"
        if isinstance(choice, dict):
            names = {t["function"]["name"] for t in body["tools"]}
            if choice.get("function", {}).get("name") not in names:
                return "tool_choice names a tool that is not in tools"
        elif choice not in ("none", "auto", "required"):
            return f"tool_choice: {choice!r}"
    return None


def _problem_llama_cpp_python(body: dict[str, Any]) -> str | None:
    """llama-cpp-python 0.3.36 (llama_cpp/llama_types.py): an assistant turn's `content` is a
    NotRequired[str] (null fails validation; left out, its chat template fails), tool calls are
    exactly {id, type: "function", function: {name, arguments: str}}."""
    for i, m in enumerate(body.get("messages") or []):
        if m.get("role") == "assistant":
            if "content" not in m:
                return "'dict object' has no attribute 'content'"
            if not isinstance(m["content"], str):
                return f"7 validation errors: messages.{i}.content: should be a valid string"
            if "function_call" in m and not isinstance(m["function_call"], dict):
                return f"messages.{i}.function_call: expected an object"
            for c in m.get("tool_calls") or []:
                if set(c) != {"id", "type", "function"} or c["type"] != "function":
                    return f"messages.{i}.tool_calls: extra or missing members: {sorted(c)}"
                if not isinstance(c["function"].get("arguments"), str):
                    return f"messages.{i}.tool_calls.function.arguments: expected a string"
        if m.get("role") == "tool" and not isinstance(m.get("content"), str | None):
            return f"messages.{i}.tool.content: Input should be a valid string"
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        names = {t["function"]["name"] for t in body.get("tools") or []}
        if choice["function"]["name"] not in names:
            return f"Tool choice '{choice['function']['name']}' not found in tools."
    return _problem_openai(body)


def _problem_llama_server(body: dict[str, Any]) -> str | None:
    """llama.cpp's server (common_chat_msgs_parse_oaicompat): content a string, an array of
    text parts, or null; tool calls of type "function" with a name."""
    for m in body.get("messages") or []:
        content = m.get("content")
        if "content" not in m and "tool_calls" not in m:
            return "Expected 'content' or 'tool_calls'"
        if content is not None and not isinstance(content, str | list):
            return "Invalid 'content' type: expected string or array"
        for c in m.get("tool_calls") or []:
            if c.get("type") != "function" or "name" not in (c.get("function") or {}):
                return f"Unsupported tool call type: {c}"
    return _problem_openai(body)


def _no_nulls(value: Any, where: str) -> str | None:
    if value is None:
        return f"{where}: null is not allowed"
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _no_nulls(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _no_nulls(v, f"{where}[{i}]"))), None)
    return None


def _problem_strict(body: dict[str, Any]) -> str | None:
    """The strictest of vLLM's and Ollama's OpenAI layers, and of validating gateways: no null
    members in assistant and tool turns, no legacy `function_call` beside `tool_calls`,
    arguments that parse to a JSON object (vLLM json.loads them; Ollama reads an object)."""
    for i, m in enumerate(body.get("messages") or []):
        if m.get("role") not in ("assistant", "tool"):
            continue
        if problem := _no_nulls(m, f"messages[{i}]"):
            return problem
        if "tool_calls" in m and "function_call" in m:
            return f"messages[{i}]: function_call beside tool_calls"
        if m["role"] == "tool" and not isinstance(m.get("content"), str):
            return f"messages[{i}].content: expected a string"
        for c in m.get("tool_calls") or []:
            try:
                args = json.loads(c["function"]["arguments"])
            except (ValueError, KeyError, TypeError):
                return "invalid tool call arguments"
            if not isinstance(args, dict):
                return "invalid tool call arguments"
    return _problem_openai(body)


@dataclass
class Kind:
    name: str
    problem: Callable[[dict[str, Any]], str | None]
    status: int  # how it refuses a request it cannot take
    first_call: Callable[[bool], Any]  # the model calls get_weather (stream or not)
    two_calls: Callable[[bool], Any]  # get_weather and delete_file in one answer
    text: Callable[[bool, str], Any]  # the model answers in text


def _lcp_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    full = {"role": None, "content": None, "function_call": None, "tool_calls": None, **delta}
    return {
        "id": "chatcmpl-lcp",
        "object": "chat.completion.chunk",
        "created": 1796183479,
        "model": "qwen2.5-coder-0.5b-instruct",
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": None, "delta": full}],
    }


def _lcp_stream(calls: list[tuple[str, str]]) -> list[Any]:
    """llama-cpp-python's tool-call stream, as recorded: a null-filled role chunk, then one
    chunk per argument token repeating the call's id, type and name, with a legacy
    function_call mirror."""
    events = [_lcp_chunk({"role": "assistant"})]
    for i, (name, args) in enumerate(calls):
        call_id = f"call__{i}_{name}_cmpl-lcp"
        for piece in [args[j : j + 4] for j in range(0, len(args), 4)] + [""]:
            fn = {"name": name, "arguments": piece}
            entry = {"index": i, "id": call_id, "type": "function", "function": fn}
            events.append(_lcp_chunk({"function_call": fn, "tool_calls": [entry]}))
    events.append(_lcp_chunk({}, "tool_calls"))
    return events


def _lcp_text(stream: bool, text: str) -> Any:
    if stream:
        pieces = [_lcp_chunk({"content": w + " "}) for w in text.split(" ")]
        return SSE([_lcp_chunk({"role": "assistant"}), *pieces, _lcp_chunk({}, "stop")])
    body = completion(content=text)
    del body["choices"][0]["message"]["refusal"]
    return body


def _lcp_two(stream: bool) -> Any:
    calls = [("get_weather", WEATHER_ARGS), ("delete_file", '{"path": "/tmp/x"}')]
    if stream:
        return SSE(_lcp_stream(calls))
    body = json.loads((LCP / "chat_tool_call.json").read_text())
    message = body["choices"][0]["message"]
    message["tool_calls"].append(
        {
            "id": "call__1_delete_file",
            "type": "function",
            "function": {"name": "delete_file", "arguments": calls[1][1]},
        }
    )
    return body


def _raw_sse(path: Path) -> web.StreamResponse | Callable[[Any], Any]:
    data = path.read_bytes()

    async def send(received: Any) -> web.Response:
        return web.Response(body=data, headers={"Content-Type": "text/event-stream"})

    return send


def _recorded_call(stream: bool) -> Any:
    if stream:
        return _raw_sse(LCP / "chat_stream_tool_call.sse")
    return json.loads((LCP / "chat_tool_call.json").read_text())


def _generic_calls(
    stream: bool, calls: list[tuple[str, str]], whole: bool = False, mirror: bool = False
) -> Any:
    if not stream:
        body = completion(*[(n, a) for n, a in calls], ids=[f"call_{n}" for n, _ in calls])
        message = body["choices"][0]["message"]
        del message["refusal"]
        if whole:  # Ollama: content "" and an index in each call
            message["content"] = ""
            for i, c in enumerate(message["tool_calls"]):
                c["index"] = i
        return body
    if not whole:
        return SSE(chat_stream(*calls, ids=[f"call_{n}" for n, _ in calls]))
    entries = [
        {
            "id": f"call_{n}",
            "index": i,
            "type": "function",
            "function": {"name": n, "arguments": a},
        }
        for i, (n, a) in enumerate(calls)
    ]
    return SSE(
        [
            chunk({"role": "assistant", "content": "", "tool_calls": entries}),
            chunk({"role": "assistant", "content": ""}, "tool_calls"),
        ]
    )


def _generic_text(stream: bool, text: str) -> Any:
    return SSE(chat_stream(text=text)) if stream else completion(content=text)


def _llama_server_text(stream: bool, text: str) -> Any:
    if not stream:
        body = json.loads((LLAMA_SERVER / "chat_auto.json").read_text())
        body["choices"][0]["message"]["content"] = text
        return body
    events = [chunk({"role": "assistant", "content": None})]
    events += [chunk({"content": w + " "}) for w in text.split(" ")]
    return SSE([*events, chunk({}, "stop")])


TWO = [("get_weather", WEATHER_ARGS), ("delete_file", '{"path": "/tmp/x"}')]
KINDS = [
    Kind(
        "openai",
        _problem_openai,
        400,
        lambda s: _generic_calls(s, [TWO[0]]),
        lambda s: _generic_calls(s, TWO),
        _generic_text,
    ),
    Kind(
        "llama-cpp-python-0.3.36",
        _problem_llama_cpp_python,
        500,  # measured: a validation error is a 500 there
        _recorded_call,
        _lcp_two,
        _lcp_text,
    ),
    Kind(
        "llama-server-b11434",
        _problem_llama_server,
        400,
        lambda s: _generic_calls(s, [TWO[0]]),
        lambda s: _generic_calls(s, TWO),
        _llama_server_text,
    ),
    Kind(
        "strict (vllm/ollama)",
        _problem_strict,
        400,
        lambda s: _generic_calls(s, [TWO[0]], whole=True),
        lambda s: _generic_calls(s, TWO, whole=True),
        _generic_text,
    ),
]


def _checked(kind: Kind, reply: Any) -> Callable[[Any], Any]:
    """`reply`, once the request passed the kind's schema; its error otherwise."""

    async def answer(received: Any) -> Any:
        problem = kind.problem(received.body)
        if problem is not None:
            error = {"message": problem, "type": "invalid_request_error", "param": None}
            return web.json_response({"error": {**error, "code": None}}, status=kind.status)
        return await reply(received) if callable(reply) else reply

    return answer


async def _ask(proxy: Any, sync: bool, stream: bool, **kw: Any) -> tuple[str, list[Any]]:
    """The client's answer (text, tool calls), through the real SDK, sync or async."""
    kw = {"model": "qwen2.5-coder-0.5b-instruct", "tools": KIND_TOOLS, **kw}
    if sync:
        client = proxy.sync_client()

        def run() -> Any:
            if not stream:
                return client.chat.completions.create(**kw)
            with client.chat.completions.stream(**kw) as s:
                return s.get_final_completion()

        final = await asyncio.to_thread(run)
    elif stream:
        async with proxy.client().chat.completions.stream(**kw) as s:
            final = await s.get_final_completion()
    else:
        final = await proxy.client().chat.completions.create(**kw)
    message = final.choices[0].message
    return message.content or "", list(message.tool_calls or [])


MODES = [(False, False), (False, True), (True, False), (True, True)]
MODE_IDS = ["async", "async-stream", "sync", "sync-stream"]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@pytest.mark.parametrize(("sync", "stream"), MODES, ids=MODE_IDS)
async def test_kind_reprompt_round_reaches_the_model(make_proxy, upstream, kind, sync, stream):
    proxy = await make_proxy(DENY_WEATHER)
    seen = records(proxy)
    upstream.push(
        _checked(kind, kind.first_call(stream)),
        _checked(kind, kind.text(stream, "I cannot check the weather.")),
    )
    force = {"type": "function", "function": {"name": "get_weather"}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    text, calls = await _ask(proxy, sync, stream, messages=messages, tool_choice=force)
    assert text.strip() == "I cannot check the weather."  # the model's answer, not a notice
    assert calls == []
    first, second = upstream.bodies()
    assert first["tool_choice"] == force
    turn, result = second["messages"][-2:]
    assert turn["role"] == "assistant" and turn["content"] == ""
    assert "function_call" not in turn
    assert [c["function"]["name"] for c in turn["tool_calls"]] == ["get_weather"]
    assert json.loads(turn["tool_calls"][0]["function"]["arguments"]) == json.loads(WEATHER_ARGS)
    assert result["role"] == "tool" and result["tool_call_id"] == turn["tool_calls"][0]["id"]
    assert json.loads(result["content"])["error"] == "tool_call_blocked"
    assert second["tool_choice"] == "auto"  # delete_file is still there to call
    assert [(r["tool"], r["action"]) for r in seen] == [("get_weather", "reprompt")]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@pytest.mark.parametrize(("sync", "stream"), MODES, ids=MODE_IDS)
async def test_kind_next_turn_carries_the_blocked_call(make_proxy, upstream, kind, sync, stream):
    proxy = await make_proxy(DENY_WEATHER)
    upstream.push(_checked(kind, kind.two_calls(stream)))
    messages: list[Any] = [{"role": "user", "content": "Weather, then clean up."}]
    text, calls = await _ask(proxy, sync, stream, messages=messages)
    assert [c.function.name for c in calls] == ["delete_file"]  # the blocked one is gone
    # The client's next turn, as a careful client writes it for any server: content "".
    call = calls[0]
    messages += [
        {
            "role": "assistant",
            "content": text,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "deleted"},
    ]
    upstream.push(_checked(kind, kind.text(stream, "Done.")))
    text, calls = await _ask(proxy, sync, stream, messages=messages)
    assert text.strip() == "Done." and calls == []
    sent = upstream.bodies()[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    names = [c["function"]["name"] for c in sent[1]["tool_calls"]]
    assert sorted(names) == ["delete_file", "get_weather"]


@pytest.mark.parametrize(("sync", "stream"), MODES, ids=MODE_IDS)
async def test_kind_that_refuses_the_reprompt_gets_the_strip_answer(
    make_proxy, upstream, sync, stream
):
    # llama-cpp-python as callgate used to meet it: any reprompt round answered 500.
    proxy = await make_proxy(DENY_WEATHER)
    seen = records(proxy)
    refuse = Kind("refusing", lambda b: "boom" if len(b["messages"]) > 1 else None, 500,
                  _recorded_call, _lcp_two, _lcp_text)  # fmt: skip
    upstream.push(_checked(refuse, _recorded_call(stream)), _checked(refuse, "unused"))
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    force = {"type": "function", "function": {"name": "get_weather"}}
    text, calls = await _ask(proxy, sync, stream, messages=messages, tool_choice=force)
    assert calls == []
    assert text.startswith("[callgate] blocked tool call: get_weather")
    assert len(upstream.bodies()) == 2
    assert [(r["tool"], r["action"], r.get("upstream_status")) for r in seen] == [
        ("get_weather", "reprompt_failed", "500")
    ]


async def test_recorded_llama_cpp_python_stream_is_replayed_whole(make_proxy, upstream):
    """The recording itself, allowed: the client gets one call, its id, type and name once,
    its arguments whole, and no legacy function_call."""
    proxy = await make_proxy({})
    upstream.push(_raw_sse(LCP / "chat_stream_tool_call.sse"))
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    text, calls = await _ask(proxy, False, True, messages=messages)
    assert text == ""
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", json.loads(WEATHER_ARGS))
    ]
    assert calls[0].id == "call__0_get_weather_cmpl-d332bd53-d943-40d6-9174-abb5c4684c4c"


def test_generated_llama_cpp_python_stream_matches_the_recording() -> None:
    """The two-call stream the kind replays has the recorded shape, event for event."""
    recorded = [
        json.loads(e[len("data: ") :])
        for e in (LCP / "chat_stream_tool_call.sse").read_text().split("\n\n")
        if e.startswith("data: {")
    ]
    generated = _lcp_stream([("get_weather", WEATHER_ARGS)])
    for got, want in (
        (generated[0], recorded[0]),
        (generated[1], recorded[1]),
        (generated[-1], recorded[-1]),
    ):
        assert set(got["choices"][0]["delta"]) == set(want["choices"][0]["delta"])
        assert got["choices"][0].keys() == want["choices"][0].keys()
    mirror = recorded[1]["choices"][0]["delta"]
    assert mirror["function_call"]["name"] == mirror["tool_calls"][0]["function"]["name"]
