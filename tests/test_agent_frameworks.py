"""Real agent frameworks through callgate: the openai-agents SDK and LangChain."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SSE
from tests.streams import chat_stream

agents = pytest.importorskip("agents")
langchain_openai = pytest.importorskip("langchain_openai")


async def test_openai_agents_chat_model_rate_limited_tool(make_proxy, upstream):
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    proxy = await make_proxy(
        {"tools": {"get_weather": {"rate_limit": {"max_calls": 1, "window": 3600}}}}
    )
    ran: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"sunny in {city}"

    upstream.push(
        # The model asks for two parallel calls; the limit admits only the first.
        SSE(
            chat_stream(
                ("get_weather", {"city": "Paris"}),
                ("get_weather", {"city": "Rome"}),
                ids=["c_paris", "c_rome"],
            )
        ),
        SSE(chat_stream(text="Paris is sunny; Rome I could not check.")),
    )
    model = OpenAIChatCompletionsModel(model="gpt-test", openai_client=proxy.client())
    agent = Agent(name="weather", instructions="Answer.", tools=[get_weather], model=model)
    result = Runner.run_streamed(agent, "Weather in Paris and Rome?")
    async for _ in result.stream_events():
        pass
    assert result.final_output == "Paris is sunny; Rome I could not check. "
    assert ran == ["Paris"]  # the blocked call never executed
    second = upstream.bodies()[1]["messages"]
    assistant = next(m for m in second if m["role"] == "assistant")
    assert sorted(c["id"] for c in assistant["tool_calls"]) == ["c_paris", "c_rome"]
    results = {m["tool_call_id"]: m["content"] for m in second if m["role"] == "tool"}
    assert results["c_paris"] == "sunny in Paris"
    assert json.loads(results["c_rome"])["message"] == "Rate limit: 1 >= 1"


async def test_langchain_bind_tools_streaming(make_proxy, upstream):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def search_web(query: str) -> str:
        """Search the web."""
        return query

    @tool
    def delete_file(path: str) -> str:
        """Delete a file."""
        return path

    proxy = await make_proxy({"on_block": "strip", "tools": {"delete_file": {"allow": False}}})
    upstream.push(
        SSE(
            chat_stream(
                ("delete_file", {"path": "/etc"}),
                ("search_web", {"query": "callgate"}),
                ids=["c_del", "c_s"],
            )
        )
    )
    llm = ChatOpenAI(
        model="gpt-test", base_url=proxy.url, api_key="sk-test", max_retries=0, streaming=True
    ).bind_tools([search_web, delete_file])
    merged = None
    async for part in llm.astream("find callgate"):
        merged = part if merged is None else merged + part
    assert merged is not None
    assert [(c["name"], c["args"], c["id"]) for c in merged.tool_calls] == [
        ("search_web", {"query": "callgate"}, "c_s")
    ]
    assert merged.invalid_tool_calls == []
    assert "delete_file" in merged.content
