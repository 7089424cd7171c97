"""Streaming Responses API through callgate: the openai SDK's event stream and stream helper."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import SSE, records
from tests.responses_streams import (
    USAGE,
    FakeResponses,
    ctc,
    fc,
    msg,
    response,
    rs,
    sse_event,
    stream_events,
)

TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("ok", "bad", "get_weather")
]
BAD = {"tools": {"bad": {"allow": False}}}


async def events_of(stream: Any) -> list[Any]:
    return [event async for event in stream]


def check_wire(events: list[Any]) -> None:
    """What every client may rely on: numbering without gaps, one index per item, one id."""
    assert [e.sequence_number for e in events] == list(
        range(events[0].sequence_number, len(events))
    )
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == list(range(len(added))) and done == added
    ids = {e.response.id for e in events if hasattr(e, "response")}
    assert len(ids) == 1


def final_calls(resp: Any) -> list[str]:
    return [o.call_id for o in resp.output if o.type in ("function_call", "custom_tool_call")]


async def test_allowed_stream_passes_unchanged(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    body = response(msg("Let me check."), fc("get_weather", {"city": "Paris"}, "c1"))
    upstream.push(api.reply(body))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/responses",
            json={"model": "m", "input": "hi", "stream": True, "tools": TOOLS},
        ) as resp,
    ):
        raw = await resp.read()
    assert raw == b"".join(stream_events({**body, "previous_response_id": None}))


async def test_stream_helper_allowed(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    upstream.push(api.reply(response(msg("Checking."), fc("get_weather", {"city": "Oslo"}, "c1"))))
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Checking."
    assert final_calls(final) == ["c1"]
    assert json.loads(final.output[1].arguments) == {"city": "Oslo"}


async def test_one_of_two_blocked_stream_helper(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(
        api.reply(response(msg("Two calls."), fc("bad", {"x": 1}, "c_bad"), fc("ok", {}, "c_ok")))
    )
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_wire(events)
    assert final_calls(final) == ["c_ok"]
    assert [o.type for o in final.output] == ["message", "function_call", "message"]
    assert final.output_text == "Two calls.\n\n[callgate] blocked tool call: bad " + (
        "(Policy violation: tool 'bad' is not allowed)"
    )
    assert not any("c_bad" in e.model_dump_json(warnings=False) for e in events)
    assert {(r["tool"], r["decision"], r["action"]) for r in seen} == {
        ("bad", "blocked", "strip+stash"),
        ("ok", "allowed", None),
    }


async def test_create_stream_partial_block_then_follow_up(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("ok", {"a": 1}, "c_ok"), fc("bad", {}, "c_bad"))),
        api.reply(response(msg("done"))),
    )
    client = proxy.client()
    events = await events_of(
        await client.responses.create(model="m", input="hi", tools=TOOLS, stream=True)
    )
    check_wire(events)
    completed = events[-1]
    assert completed.type == "response.completed"
    assert final_calls(completed.response) == ["c_ok"]
    follow = await client.responses.create(
        model="m",
        previous_response_id=completed.response.id,
        input=[{"type": "function_call_output", "call_id": "c_ok", "output": "1"}],
        tools=TOOLS,
        stream=True,
    )
    follow_events = await events_of(follow)
    assert follow_events[-1].response.output_text == "done"
    sent = upstream.bodies("/v1/responses")[1]["input"]
    assert {i["call_id"] for i in sent} == {"c_ok", "c_bad"}


async def test_all_blocked_reprompt_continues_same_stream(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    seen = records(proxy)
    api = FakeResponses()
    first = response(msg("Trying."), fc("bad", {"x": 1}, "c1"))
    upstream.push(
        api.reply(first),
        api.reply(response(msg("Sorry, I cannot."), usage={**USAGE, "total_tokens": 20})),
    )
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_wire(events)
    assert final.id == first["id"]
    assert final.output_text == "Trying.Sorry, I cannot."
    assert final_calls(final) == []
    assert final.usage.total_tokens == 35
    assert [e.type for e in events].count("response.created") == 1
    second = upstream.bodies("/v1/responses")[1]
    assert second["stream"] is True and second["previous_response_id"] == first["id"]
    assert [i["call_id"] for i in second["input"]] == ["c1"]
    assert [r["action"] for r in seen] == ["reprompt"]
    # The client continues from the id it saw: callgate points the upstream at the last round.
    upstream.push(api.reply(response(msg("next"))))
    await proxy.client().responses.create(
        model="m", previous_response_id=final.id, input="thanks", tools=TOOLS
    )
    third = upstream.bodies("/v1/responses")[2]
    assert third["previous_response_id"] != first["id"]
    assert third["previous_response_id"] in api.stored
    # And reading it back shows what the client saw.
    upstream.push(api.get)
    got = await proxy.client().responses.retrieve(final.id)
    assert got.id == final.id and got.output_text == "Trying.Sorry, I cannot."


async def test_reasoning_before_blocked_call_is_dropped_with_it(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    api = FakeResponses()
    upstream.push(
        api.reply(
            response(
                rs("first"), fc("bad", {}, "c_bad"), rs("second"), msg("Hi."), fc("ok", {}, "c_ok")
            )
        )
    )
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_wire(events)
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call", "message"]
    assert final.output[0].summary[0].text == "second"


async def test_custom_tool_rule_stream(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "tools": {
                "shell": {"rules": [{"name": "no_rm", "deny_if": 'args.input.contains("rm ")'}]}
            },
        }
    )
    api = FakeResponses()
    upstream.push(
        api.reply(response(ctc("shell", "rm -rf /tmp/x", "c1"))),
        api.reply(response(ctc("shell", "ls", "c2"))),
    )
    client = proxy.client()
    tools = [{"type": "custom", "name": "shell"}]
    async with client.responses.stream(model="m", input="x", tools=tools) as stream:
        blocked = await stream.get_final_response()
    assert final_calls(blocked) == []
    assert "Policy violation: no_rm" in blocked.output_text
    events = await events_of(
        await client.responses.create(model="m", input="x", tools=tools, stream=True)
    )
    check_wire(events)
    assert events[-1].response.output[0].input == "ls"
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    assert "".join(deltas) == "ls"


async def test_error_mode_stream_error_event(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "error"})
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(api.reply(response(msg("Hm."), fc("bad", {}, "c1"))))
    stream = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS, stream=True)
    with pytest.raises(openai.APIError) as err:
        await events_of(stream)
    assert "blocked by callgate" in err.value.message
    assert err.value.body["code"] == "rules" and err.value.body["type"] == "tool_call_blocked"
    assert [(r["tool"], r["decision"]) for r in seen] == [("bad", "blocked")]


async def test_error_mode_stream_helper(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "error"})
    api = FakeResponses()
    upstream.push(api.reply(response(fc("bad", {}, "c1"))))
    with pytest.raises(openai.APIError) as err:
        async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as s:
            await s.get_final_response()
    assert err.value.body["code"] == "rules"


async def test_text_events_forwarded_as_raw_bytes(make_proxy, upstream):
    proxy = await make_proxy({})
    odd = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"sequence_number":3,   "item_id":"m1","output_index":0,"content_index":0,'
        b'"delta":"hi","logprobs":[],"extra":1.50}\n\n'
    )
    base = response(msg("hi"), rid="resp_raw")
    events = stream_events(base)
    # Keep created, in_progress, item added, part added; then our odd delta; then the rest.
    upstream.push(SSE([*events[:4], odd, *events[5:]], done=False))
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/responses", json={"model": "m", "input": "x", "stream": True}) as r,
    ):
        raw = await r.read()
    assert odd in raw  # untouched: spacing and 1.50 would not survive a re-encode


async def test_renumbering_after_a_drop_is_byte_level(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    api = FakeResponses()
    upstream.push(api.reply(response(fc("bad", {}, "call_blocked_x"), msg("after the call"))))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/responses",
            json={"model": "m", "input": "x", "stream": True, "tools": TOOLS},
        ) as r,
    ):
        raw = await r.read()
    datas = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    indexes = [d["output_index"] for d in datas if "output_index" in d]
    assert sorted(set(indexes)) == [0, 1]  # the text message moved up to 0; the notice is 1
    assert b"call_blocked_x" not in raw  # a distinctive id: random ids may contain "c1"


async def test_upstream_error_event_passes_through(make_proxy, upstream):
    proxy = await make_proxy({})
    events = stream_events(response(msg("partial answer")))
    error = {
        "type": "error",
        "sequence_number": 5,
        "error": {"type": "server_error", "code": "server_error", "message": "boom", "param": None},
    }
    upstream.push(SSE([*events[:5], sse_event(error)], done=False))
    stream = await proxy.client().responses.create(model="m", input="x", stream=True)
    with pytest.raises(openai.APIError) as err:
        await events_of(stream)
    assert err.value.message == "boom"


async def test_response_failed_passes_through(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    failed = response(fc("bad", {}, "c1"), status="failed")
    failed["error"] = {"code": "server_error", "message": "model crashed"}
    upstream.push(SSE(stream_events(failed), done=False))
    events = await events_of(
        await proxy.client().responses.create(model="m", input="x", stream=True, tools=TOOLS)
    )
    assert events[-1].type == "response.failed"
    assert events[-1].response.output == []
    assert events[-1].response.error.message == "model crashed"


@pytest.mark.parametrize(
    "cut,tail,code",
    [
        (5, [], "incomplete_tool_call"),  # the upstream closes mid-arguments
        (5, [b"data: {not json\n\n"], "upstream_malformed"),
        (7, [], "upstream_truncated"),  # the call went out; the stream ends without completing
    ],
)
async def test_faults_fail_closed(make_proxy, upstream, cut, tail, code):
    proxy = await make_proxy({})
    seen = records(proxy)
    events = stream_events(response(msg("x"), fc("ok", {"a": "long enough"}, "c1")), piece=4)
    # 0 created, 1 in_progress, 2-7 message; then the call: 8 added, 9.. deltas
    upstream.push(SSE([*events[: 9 + cut - 5], *tail], done=False))
    if code == "upstream_truncated":
        full = stream_events(response(fc("ok", {}, "c1")))
        upstream.replies[-1] = SSE(full[:-1], done=False)  # everything but response.completed
    stream = await proxy.client().responses.create(model="m", input="x", stream=True, tools=TOOLS)
    with pytest.raises(openai.APIError) as err:
        await events_of(stream)
    assert err.value.body["code"] == code
    if code == "upstream_truncated":
        # The call went out before the stream broke: recorded as it was sent.
        assert [(r["tool"], r["decision"], r["action"]) for r in seen] == [("ok", "allowed", None)]
    else:
        assert [(r["tool"], r["decision"], r["reason"]) for r in seen] == [("ok", "blocked", code)]


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
        await proxy.client().responses.create(model="m", input="hi", stream=True)
    assert err.value.response.headers["retry-after"] == "3"


async def test_events_split_across_network_chunks(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    body = response(msg("Two calls here."), fc("bad", {"x": 1}, "c_bad"), fc("ok", {}, "c_ok"))
    data = b"".join(stream_events(body))
    upstream.push(SSE([data[i : i + 7] for i in range(0, len(data), 7)], done=False))
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_wire(events)
    assert final_calls(final) == ["c_ok"]
    assert final.output_text.startswith("Two calls here.\n\n[callgate]")


async def test_terminal_event_cannot_swap_a_streamed_calls_arguments(make_proxy, upstream):
    """The SDK builds its final response from `response.completed`: a call repeated there with
    other arguments than were streamed (and gated) must reach the client as streamed."""
    proxy = await make_proxy(
        {"tools": {"ok": {"rules": [{"name": "no_rm", "deny_if": 'args.cmd == "rm -rf /"'}]}}}
    )
    streamed = response(fc("ok", {"cmd": "ls"}, "c1"))
    swapped = {**streamed, "output": [{**streamed["output"][0], "arguments": '{"cmd":"rm -rf /"}'}]}
    events = stream_events(streamed)
    last = len(events) - 1
    assert b"response.completed" in events[last]
    events[last] = sse_event(
        {"type": "response.completed", "sequence_number": last, "response": swapped}
    )
    upstream.push(SSE(events))
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        final = await stream.get_final_response()
    assert final_calls(final) == ["c1"]
    assert json.loads(final.output[0].arguments) == {"cmd": "ls"}
