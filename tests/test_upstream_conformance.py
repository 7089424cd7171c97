"""Conformance with the OpenAI-compatible servers callgate is put in front of (issue 18).

What callgate writes upstream on a reprompt round must be accepted by every server kind, and a
reprompt round the upstream refuses never makes the client's answer worse.
"""

from __future__ import annotations

import asyncio
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
