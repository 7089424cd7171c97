"""Streaming Chat Completions through callgate: the openai SDK's stream readers as clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import SSE, completion, records
from tests.streams import BASE, chat_stream, chunk

MSGS = [{"role": "user", "content": "hi"}]
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("ok", "bad", "get_weather")
]


async def collect(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None, Any]:
    """Text, calls by index, finish_reason and usage, as a careful client accumulates them."""
    text, calls, finish, usage = "", {}, None, None
    async for ch in stream:
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                entry["id"] += tc.id or ""
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["args"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    return text, calls, finish, usage


async def test_all_allowed_stream(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(
        SSE(chat_stream(("ok", {"a": 1}), ("get_weather", {"city": "Paris"}), text="Let me check"))
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    text, calls, finish, _ = await collect(stream)
    assert text == "Let me check "
    assert finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["args"])) for _, c in sorted(calls.items())] == [
        ("call_ok_0", "ok", {"a": 1}),
        ("call_get_weather_1", "get_weather", {"city": "Paris"}),
    ]


async def test_stream_helper_one_of_two_blocked(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    seen = records(proxy)
    upstream.push(SSE(chat_stream(("bad", {"x": 1}), ("ok", {"a": 1}), ids=["c_bad", "c_ok"])))
    async with proxy.client().chat.completions.stream(
        model="m", messages=MSGS, tools=TOOLS
    ) as stream:
        final = await stream.get_final_completion()
    message = final.choices[0].message
    # The surviving call is re-indexed to 0: the SDK helper crashes on gaps.
    assert [(c.id, c.function.name) for c in message.tool_calls] == [("c_ok", "ok")]
    assert json.loads(message.tool_calls[0].function.arguments) == {"a": 1}
    assert final.choices[0].finish_reason == "tool_calls"
    assert "bad" in message.content
    assert {(r["tool"], r["decision"]) for r in seen} == {("bad", "blocked"), ("ok", "allowed")}


async def test_all_blocked_reprompt_continues_same_stream(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(
        SSE(chat_stream(("bad", {"x": 1}), ids=["c1"], text="Trying", include_usage=True)),
        SSE(
            [
                {**e, "id": "chatcmpl-second", "model": "other"}
                for e in chat_stream(text="Sorry, I cannot.", include_usage=True)
            ]
        ),
    )
    client = proxy.client()
    ids, models = set(), set()
    stream = await client.chat.completions.create(
        model="m", messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = "", None, None
    async for ch in stream:
        ids.add(ch.id)
        models.add(ch.model)
        usage = ch.usage or usage
        for choice in ch.choices:
            text += choice.delta.content or ""
            assert not choice.delta.tool_calls
            finish = choice.finish_reason or finish
    assert text == "Trying Sorry, I cannot. "
    assert finish == "stop"
    assert ids == {"chatcmpl-stream"} and models == {"gpt-test"}
    assert usage.total_tokens == 30  # both rounds
    second = upstream.bodies()[1]
    assert second["stream"] is True
    assert second["messages"][-2] == {
        "role": "assistant",
        "content": "Trying ",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "bad", "arguments": '{"x": 1}'}}
        ],
    }
    assert json.loads(second["messages"][-1]["content"])["reason"] == "tool_not_allowed"


async def test_reprompt_stream_with_sdk_helper(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(SSE(chat_stream(("bad", {}))), SSE(chat_stream(text="Done.")))
    async with proxy.client().chat.completions.stream(model="m", messages=MSGS) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "Done. "
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.tool_calls in (None, [])


async def test_error_mode_stream_error_event(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "error", "tools": {"bad": {"allow": False}}})
    upstream.push(SSE(chat_stream(("bad", {}))))
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError) as err:
        await collect(stream)
    assert "blocked by callgate" in err.value.message
    assert err.value.body["code"] == "rules"


async def test_usage_chunk_kept(make_proxy, upstream):
    proxy = await make_proxy({})
    upstream.push(SSE(chat_stream(("ok", {}), include_usage=True)))
    stream = await proxy.client().chat.completions.create(
        model="m", messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    _, calls, finish, usage = await collect(stream)
    assert usage.total_tokens == 15 and finish == "tool_calls" and calls[0]["name"] == "ok"


async def test_text_chunks_forwarded_as_raw_bytes(make_proxy, upstream):
    proxy = await make_proxy({})
    odd = (
        b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"hi"},   "finish_reason":null}],"extra":1.50}\n\n'
    )
    upstream.push(SSE([odd, chunk({}, "stop")]))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/chat/completions", json={"model": "m", "messages": MSGS, "stream": True}
        ) as resp,
    ):
        body = await resp.read()
    assert body.startswith(odd)  # untouched: spacing and 1.50 would not survive a re-encode
    assert body.endswith(b"data: [DONE]\n\n")


async def test_legacy_function_call_stream_gated(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    upstream.push(
        SSE(
            [
                chunk({"role": "assistant", "content": None}),
                chunk({"function_call": {"name": "bad", "arguments": ""}}),
                chunk({"function_call": {"arguments": '{"a":'}}),
                chunk({"function_call": {"arguments": "1}"}}),
                chunk({}, "function_call"),
            ]
        )
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    names, finish, text = [], None, ""
    async for ch in stream:
        for choice in ch.choices:
            if choice.delta.function_call:
                names.append(choice.delta.function_call.name)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert names == [] and finish == "stop" and "bad" in text


async def test_llamacpp_style_repeats_do_not_duplicate(make_proxy, upstream):
    proxy = await make_proxy({})

    def rep(args: str) -> dict[str, Any]:
        # llama.cpp repeats id/type/name in every delta and mirrors a legacy function_call.
        return chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_x",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": args},
                    }
                ],
                "function_call": {"name": "get_weather", "arguments": args},
            }
        )

    upstream.push(
        SSE(
            [
                chunk({"role": "assistant", "content": None}),
                rep('{"city"'),
                rep(': "Oslo"}'),
                chunk({}, "tool_calls"),
            ]
        )
    )
    async with proxy.client().chat.completions.stream(
        model="m", messages=MSGS, tools=TOOLS
    ) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_x", "get_weather", '{"city": "Oslo"}')
    ]
    assert final.choices[0].message.function_call is None


@pytest.mark.parametrize(
    "tail,code",
    [
        ([], "incomplete_tool_call"),  # upstream closes with the call's arguments incomplete
        ([b"data: {not json\n\n"], "upstream_malformed"),
    ],
)
async def test_faults_fail_closed(make_proxy, upstream, tail, code):
    proxy = await make_proxy({})
    seen = records(proxy)
    events = [
        chunk({"role": "assistant", "content": None}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "ok", "arguments": '{"a":'},
                    }
                ]
            }
        ),
        *tail,
    ]
    upstream.push(SSE(events, done=False))
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError) as err:
        await collect(stream)
    assert err.value.body["code"] == code
    assert [(r["tool"], r["decision"], r["reason"]) for r in seen] == [("ok", "blocked", code)]


async def test_done_before_arguments_complete_fails_closed(make_proxy, upstream):
    proxy = await make_proxy({})
    upstream.push(
        SSE(
            [
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "ok", "arguments": "{"},
                            }
                        ]
                    }
                )
            ]
        )
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError) as err:
        await collect(stream)
    assert err.value.body["code"] == "incomplete_tool_call"


async def test_partial_block_stream_stashes_for_next_turn(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(
        SSE(chat_stream(("ok", {}), ("bad", {}), ids=["c_ok", "c_bad"])), completion(content="fine")
    )
    client = proxy.client()
    async with client.chat.completions.stream(model="m", messages=MSGS, tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    msg = final.choices[0].message
    assert [c.id for c in msg.tool_calls] == ["c_ok"]
    await client.chat.completions.create(
        model="m",
        messages=[
            *MSGS,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c_ok",
                        "type": "function",
                        "function": {"name": "ok", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c_ok", "content": "1"},
        ],
    )
    sent = upstream.bodies()[1]["messages"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["c_ok", "c_bad"]
    assert {m["tool_call_id"] for m in sent if m["role"] == "tool"} == {"c_ok", "c_bad"}


async def test_upstream_error_status_passes_on_stream(make_proxy, upstream):
    from aiohttp import web

    proxy = await make_proxy({})
    upstream.push(
        web.json_response(
            {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}},
            status=429,
            headers={"retry-after": "3"},
        )
    )
    with pytest.raises(openai.RateLimitError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    assert err.value.response.headers["retry-after"] == "3"
    assert BASE["object"] == "chat.completion.chunk"


async def test_client_disconnect_cancels_upstream(make_proxy, upstream):
    proxy = await make_proxy({})
    slow = SSE(chat_stream(text=" ".join(["word"] * 200)), delay=0.01)
    upstream.push(slow)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url + "/chat/completions", json={"model": "m", "messages": MSGS, "stream": True}
        )
        await resp.content.readline()
        resp.close()  # the client goes away after the first event
    for _ in range(200):  # bounded: at most 2 s
        if slow.aborted:
            break
        await asyncio.sleep(0.01)
    assert slow.aborted
    assert slow.sent < 200


def test_raw_prefix_stops_at_the_first_event_that_may_hold_a_call():
    from proxy.sse import raw_prefix

    text = b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    call = b'data: {"choices":[{"delta":{"tool_calls":[]},"finish_reason":null}]}\n\n'
    finish = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    assert raw_prefix(text + text) == 2 * len(text)
    assert raw_prefix(text + call + text) == len(text)
    assert raw_prefix(call) == 0
    assert raw_prefix(text + finish) == len(text)
    assert raw_prefix(text + text[:10]) == len(text)  # an incomplete event waits
    assert raw_prefix(text + b"data: [DONE]\n\n") == len(text)
    assert raw_prefix(text.replace(b"\n", b"\r\n")) == 0  # CRLF goes through the splitter


async def test_text_and_calls_in_one_network_read(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    events = chat_stream(("bad", {}), ("ok", {"a": 1}), text="one two", ids=["c_bad", "c_ok"])
    blob = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    upstream.push(SSE([blob]))  # everything arrives in a single write
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    text, calls, finish, _ = await collect(stream)
    assert text.startswith("one two ")
    assert [(c["id"], c["name"]) for c in calls.values()] == [("c_ok", "ok")]
    assert finish == "tool_calls"


def test_first_finish_finds_only_non_null_finishes():
    from proxy.sse import first_finish

    null, spaced_null = b'{"finish_reason":null}', b'{"finish_reason": null}'
    stop, spaced_stop = b'{"finish_reason":"stop"}', b'{"finish_reason" : "length"}'
    assert first_finish(null * 3) == -1
    assert first_finish(spaced_null + null) == -1
    assert first_finish(null + stop) == len(null) + 1
    assert first_finish(spaced_null + spaced_stop + null) == len(spaced_null) + 1
    assert first_finish(null + stop, end=len(null)) == -1  # only before `end`
    assert first_finish(b"") == -1
