"""The Responses API end to end against llmock (a mock OpenAI server written by others)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import test_llmock
from tests.test_llmock import LLMOCK_BIN, POLICY, Mock

# llmock's server and control client, shared with the Chat Completions end-to-end tests.
llmock_process = test_llmock.llmock_process
mock = test_llmock.mock

pytestmark = pytest.mark.skipif(not LLMOCK_BIN.exists(), reason="llmock is not installed")

TOOLS = [
    {
        "type": "function",
        "name": name,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    for name in ("get_weather", "delete_file")
]


async def test_llmock_responses_stream_one_of_two_blocked(make_proxy, mock: Mock):
    proxy = await make_proxy(POLICY, upstream_url=mock.base_url)
    await mock.reply_tools(
        ("get_weather", {"city": "Paris"}), ("delete_file", {"city": "x"}), text="Let me see."
    )
    async with proxy.client().responses.stream(
        model="gpt-4o", input="Weather in Paris?", tools=TOOLS
    ) as stream:
        events: list[Any] = [e async for e in stream]
        final = await stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == list(range(len(added)))
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert final.output_text == "Let me see."
    items = [e.item for e in events if e.type.startswith("response.output_item.")]
    items += [o for e in events if hasattr(e, "response") for o in e.response.output]
    assert {getattr(i, "name", None) for i in items} == {None, "get_weather"}


async def test_llmock_responses_stream_all_blocked_reprompts(make_proxy, mock: Mock):
    proxy = await make_proxy(POLICY, upstream_url=mock.base_url)
    await mock.reply_tools(("delete_file", {"city": "x"}))
    await mock.reply_text("I may not delete files.")
    stream = await proxy.client().responses.create(
        model="gpt-4o", input="delete x", tools=TOOLS, stream=True
    )
    events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "I may not delete files."
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    _, second = await mock.bodies("/v1/responses")
    assert second["previous_response_id"] == events[0].response.id
    [out] = second["input"]
    assert out["type"] == "function_call_output"
    assert json.loads(out["output"])["reason"] == "tool_not_allowed"
