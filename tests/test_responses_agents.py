"""The openai-agents SDK with its default model (the Responses API) running through callgate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.responses_streams import FakeResponses, fc, msg, response

agents = pytest.importorskip("agents")

POLICY = {
    "tools": {
        "get_weather": {"rate_limit": {"max_calls": 10, "window": 60}},
        "delete_file": {"allow": False},
    }
}


def _agent(proxy: Any, ran: list[str]) -> tuple[Any, Any]:
    from agents import Agent, RunConfig, function_tool, set_tracing_disabled
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(f"get_weather:{city}")
        return f"sunny in {city}"

    @function_tool
    def delete_file(path: str) -> str:
        """Delete a file."""
        ran.append(f"delete_file:{path}")
        return "deleted"

    agent = Agent(
        name="assistant", instructions="Help.", tools=[get_weather, delete_file], model="gpt-test"
    )
    # The provider's default: the Responses API (no global client is touched).
    config = RunConfig(model_provider=OpenAIProvider(openai_client=proxy.client()))
    return agent, config


@pytest.mark.parametrize("streamed", [False, True])
async def test_agent_runs_with_one_tool_denied(make_proxy, upstream, streamed):
    from agents import Runner

    proxy = await make_proxy(POLICY)
    api = FakeResponses()
    upstream.push(
        # The model calls both tools at once: callgate lets the weather through only.
        api.reply(
            response(
                fc("get_weather", {"city": "Paris"}, "c_weather"),
                fc("delete_file", {"path": "/etc/passwd"}, "c_delete"),
            )
        ),
        api.reply(response(msg("Paris is sunny; I may not delete files."))),
    )
    ran: list[str] = []
    agent, config = _agent(proxy, ran)
    if streamed:
        result = Runner.run_streamed(agent, "Weather in Paris, then delete x", run_config=config)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(agent, "Weather in Paris, then delete x", run_config=config)
    assert result.final_output == "Paris is sunny; I may not delete files."
    assert ran == ["get_weather:Paris"]  # the denied tool never ran
    # The agent's second turn reached the upstream complete (the fake upstream would have
    # answered 400 "No tool output found for function call c_delete." otherwise).
    second = upstream.bodies("/v1/responses")[1]["input"]
    outputs = {i["call_id"]: i["output"] for i in second if i.get("type") == "function_call_output"}
    assert outputs["c_weather"] == "sunny in Paris"
    assert json.loads(outputs["c_delete"])["reason"] == "tool_not_allowed"


async def test_agent_only_denied_call_is_reprompted(make_proxy, upstream):
    from agents import Runner

    proxy = await make_proxy(POLICY)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("delete_file", {"path": "/"}, "c1"))),
        api.reply(response(msg("I am not allowed to delete files."))),
    )
    ran: list[str] = []
    agent, config = _agent(proxy, ran)
    result = Runner.run_streamed(agent, "delete everything", run_config=config)
    async for _ in result.stream_events():
        pass
    assert result.final_output == "I am not allowed to delete files."
    assert ran == []
    assert len(upstream.bodies("/v1/responses")) == 2
