"""The transport below the routes (proxy.transport, proxy.forward.fetch): an upstream that
cannot be had raises UpstreamError, and each non-streaming route answers it in OpenAI's error
shape, or, when a reprompt round is what failed, settles the round before it as `strip`."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import openai
import pytest

from proxy import stash
from tests.conftest import completion, records
from tests.responses_streams import FakeResponses, fc, msg, response

TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("ok", "bad")
]
CHAT_TOOLS = [{"type": "function", "function": {"name": "bad", "parameters": {"type": "object"}}}]
BAD = {"tools": {"bad": {"allow": False}}}
MSGS = [{"role": "user", "content": "hi"}]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_upstream() -> str:
    return f"http://127.0.0.1:{closed_port()}/v1"


async def test_responses_create_unreachable_is_an_openai_502(make_proxy):
    proxy = await make_proxy({}, upstream_url=dead_upstream())
    with pytest.raises(openai.InternalServerError) as err:
        await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert err.value.status_code == 502
    body: Any = err.value.body
    assert body["code"] == "upstream_unreachable" and body["type"] == "upstream_error"
    assert "upstream unreachable" in body["message"]


@pytest.mark.parametrize("items", [False, True])
async def test_reading_a_stored_response_back_unreachable_is_an_openai_502(make_proxy, items):
    proxy = await make_proxy({}, upstream_url=dead_upstream())
    # An entry of ours, so the route reads the response itself rather than passing it on.
    await proxy.state.store.put_stash(stash.responses_key("resp_1"), b'{"hide":["id:x"]}', 60)
    client = proxy.client()
    with pytest.raises(openai.InternalServerError) as err:
        if items:
            await client.responses.input_items.list("resp_1")
        else:
            await client.responses.retrieve("resp_1")
    assert err.value.status_code == 502
    assert err.value.body["code"] == "upstream_unreachable"  # type: ignore[index]


def _slow(answer: Any) -> Any:
    async def reply(rec: Any) -> Any:
        await asyncio.sleep(2)
        return answer(rec) if callable(answer) else answer

    return reply


async def test_responses_reprompt_round_timing_out_settles_as_strip(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "upstream": {"timeout": 0.3}})
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(api.reply(response(fc("bad", {}, "c_bad"))), _slow(response(msg("late"))))
    result = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert [o.type for o in result.output] == ["message"]
    assert result.output_text.startswith("[callgate] blocked tool call: bad")
    assert [(r["tool"], r["action"], r.get("upstream_status")) for r in seen] == [
        ("bad", "reprompt_failed", "timeout")
    ]


async def test_chat_reprompt_round_timing_out_settles_as_strip(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "upstream": {"timeout": 0.3}})
    seen = records(proxy)
    upstream.push(completion(("bad", {}), ids=["c1"]), _slow(completion(content="late")))
    result = await proxy.client().chat.completions.create(
        model="m", messages=MSGS, tools=CHAT_TOOLS
    )
    message = result.choices[0].message
    assert not message.tool_calls
    assert (message.content or "").startswith("[callgate] blocked tool call: bad")
    assert [(r["tool"], r["action"], r.get("upstream_status")) for r in seen] == [
        ("bad", "reprompt_failed", "timeout")
    ]
    assert upstream.bodies()[1]["messages"][-1]["tool_call_id"] == "c1"  # it was asked again
