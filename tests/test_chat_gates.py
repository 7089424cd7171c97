"""Non-streaming Chat Completions through callgate, with the real openai SDK as the client."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.conftest import completion, records

WEATHER = {"tools": {"get_weather": {"rate_limit": {"max_calls": 2, "window": 60}}}}
MSGS = [{"role": "user", "content": "hi"}]


async def test_allowed_call_passes_byte_for_byte(make_proxy, upstream):
    proxy = await make_proxy(WEATHER)
    body = completion(("get_weather", {"city": "Paris"}))
    upstream.push(body)
    client = proxy.client()
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=MSGS)
    assert json.loads(raw.http_response.content) == body
    result = raw.parse()
    call = result.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert upstream.bodies()[0]["messages"] == MSGS


async def test_sync_client_allowed(make_proxy, upstream):
    proxy = await make_proxy(WEATHER)
    upstream.push(completion(("get_weather", {"city": "Oslo"})))
    client = proxy.sync_client()
    result = await asyncio.to_thread(
        client.chat.completions.create, model="gpt-test", messages=MSGS
    )
    assert result.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert result.choices[0].finish_reason == "tool_calls"


async def test_denied_tool_strip(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"delete_file": {"allow": False}}})
    seen = records(proxy)
    upstream.push(completion(("delete_file", {"path": "/"})))
    result = await proxy.client().chat.completions.create(model="gpt-test", messages=MSGS)
    choice = result.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert "delete_file" in choice.message.content and "not allowed" in choice.message.content
    assert [(r["tool"], r["decision"], r["gate"]) for r in seen] == [
        ("delete_file", "blocked", "rules")
    ]


async def test_rate_limit_blocks_then_frees_after_window(make_proxy, upstream, clock):
    proxy = await make_proxy({**WEATHER, "on_block": "error"})
    client = proxy.client()
    for _ in range(2):
        upstream.push(completion(("get_weather", {"city": "Rome"})))
        await client.chat.completions.create(model="gpt-test", messages=MSGS)
    upstream.push(completion(("get_weather", {"city": "Rome"})))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await client.chat.completions.create(model="gpt-test", messages=MSGS)
    assert err.value.status_code == 403
    assert err.value.body["code"] == "rate_limit"
    assert err.value.body["type"] == "tool_call_blocked"
    assert "Rate limit: 2 >= 2" in err.value.body["message"]
    clock.advance(59.999)
    upstream.push(completion(("get_weather", {"city": "Rome"})))
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-test", messages=MSGS)
    clock.advance(0.001)  # exactly one window after the first call: it slides out
    upstream.push(completion(("get_weather", {"city": "Rome"})))
    result = await client.chat.completions.create(model="gpt-test", messages=MSGS)
    assert result.choices[0].message.tool_calls[0].function.name == "get_weather"


async def test_cooldown(make_proxy, upstream, clock):
    proxy = await make_proxy(
        {"on_block": "strip", "tools": {"ping": {"rate_limit": {"cooldown": 2.0}}}}
    )
    client = proxy.client()
    upstream.push(completion(("ping", {})))
    first = await client.chat.completions.create(model="gpt-test", messages=MSGS)
    assert first.choices[0].message.tool_calls
    clock.advance(0.4)
    upstream.push(completion(("ping", {})))
    second = await client.chat.completions.create(model="gpt-test", messages=MSGS)
    assert second.choices[0].message.tool_calls is None
    assert "Cooldown: 0.4s < 2.0s" in second.choices[0].message.content
    clock.advance(1.6)
    upstream.push(completion(("ping", {})))
    third = await client.chat.completions.create(model="gpt-test", messages=MSGS)
    assert third.choices[0].message.tool_calls


async def test_budget_exhausted_exactly_at_limit(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "budgets": {"search": {"max_spend": "0.03", "window": 3600}},
            "tools": {"search_web": {"budget": {"ledger": "search", "cost": "0.01"}}},
        }
    )
    client = proxy.client()
    for _ in range(3):  # 0.01 + 0.01 + 0.01 == 0.03: reaching the limit exactly is allowed
        upstream.push(completion(("search_web", {"query": "x"})))
        ok = await client.chat.completions.create(model="gpt-test", messages=MSGS)
        assert ok.choices[0].message.tool_calls
    upstream.push(completion(("search_web", {"query": "x"})))
    blocked = await client.chat.completions.create(model="gpt-test", messages=MSGS)
    assert blocked.choices[0].message.tool_calls is None
    assert "Budget exceeded: 0.03 + 0.01 > 0.03" in blocked.choices[0].message.content


async def test_budget_block_rolls_back_rate_limit_slot(make_proxy, upstream, clock):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "budgets": {"b": {"max_spend": "1.00", "window": 10}},
            "tools": {
                "t": {
                    "rate_limit": {"max_calls": 2, "window": 60},
                    "budget": {"ledger": "b", "cost": "0.60"},
                }
            },
        }
    )
    client = proxy.client()
    upstream.push(completion(("t", {})), completion(("t", {})), completion(("t", {})))
    assert (
        (await client.chat.completions.create(model="m", messages=MSGS))
        .choices[0]
        .message.tool_calls
    )
    clock.advance(1)
    second = await client.chat.completions.create(model="m", messages=MSGS)
    assert "Budget exceeded: 0.60 + 0.60 > 1.00" in second.choices[0].message.content
    clock.advance(10)  # the spend slides out of the budget window, not out of the rate limit's
    third = await client.chat.completions.create(model="m", messages=MSGS)
    # Had the budget block consumed a slot, this would be "Rate limit: 2 >= 2".
    assert third.choices[0].message.tool_calls, third.choices[0].message.content


async def test_cel_rule_and_schema_and_invalid_json(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "tools": {
                "search_web": {
                    "rules": [
                        {"name": "no_pii", "deny_if": 'args.query.lowerAscii().contains("ssn")'}
                    ],
                    "arguments_schema": {"type": "object", "required": ["query"]},
                }
            },
        }
    )
    client = proxy.client()
    cases = [
        ({"query": "my SSN is 123"}, "Policy violation: no_pii"),
        ({"q": "missing"}, "'query' is a required property"),
        ('{"query": "unterminated', "Invalid arguments: not valid JSON"),
    ]
    for args, expected in cases:
        upstream.push(completion(("search_web", args)))
        result = await client.chat.completions.create(model="m", messages=MSGS)
        assert result.choices[0].message.tool_calls is None
        assert expected in result.choices[0].message.content
    upstream.push(completion(("search_web", {"query": "weather in Paris"})))
    ok = await client.chat.completions.create(model="m", messages=MSGS)
    assert ok.choices[0].message.tool_calls[0].function.name == "search_web"


async def test_shadow_mode_records_but_allows(make_proxy, upstream):
    proxy = await make_proxy(
        {"tools": {"t": {"rate_limit": {"max_calls": 1, "window": 60, "mode": "shadow"}}}}
    )
    seen = records(proxy)
    client = proxy.client()
    for _ in range(2):
        upstream.push(completion(("t", {})))
        result = await client.chat.completions.create(model="m", messages=MSGS)
        assert result.choices[0].message.tool_calls
    assert [r["decision"] for r in seen] == ["allowed", "allowed"]
    assert seen[0]["shadow"] == []
    assert seen[1]["shadow"][0]["message"] == "Rate limit: 1 >= 1"


async def test_parallel_calls_error_mode_rolls_back_allowed(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "error",
            "tools": {
                "ok": {"rate_limit": {"max_calls": 1, "window": 60}},
                "bad": {"allow": False},
            },
        }
    )
    seen = records(proxy)
    upstream.push(completion(("ok", {}), ("bad", {})))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert err.value.body["code"] == "rules"
    assert {(r["tool"], r["decision"]) for r in seen} == {("ok", "withheld"), ("bad", "blocked")}
    # The withheld call's slot was given back: the only slot is still free.
    upstream.push(completion(("ok", {})))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.tool_calls[0].function.name == "ok"


async def test_parallel_calls_strip_mode(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    upstream.push(completion(("ok", {"a": 1}), ("bad", {}), ids=["call_ok", "call_bad"]))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    calls = result.choices[0].message.tool_calls
    assert [c.id for c in calls] == ["call_ok"]
    assert result.choices[0].finish_reason == "tool_calls"
    assert "bad" in result.choices[0].message.content


async def test_parallel_reprompt_mode_stashes_and_reinserts(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(completion(("ok", {"a": 1}), ("bad", {"b": 2}), ids=["call_ok", "call_bad"]))
    client = proxy.client()
    first = await client.chat.completions.create(model="m", messages=MSGS)
    message = first.choices[0].message
    assert [c.id for c in message.tool_calls] == ["call_ok"]
    assert message.content is None  # reprompt mode: dropped silently, no notice
    # The client runs its tool and sends the next turn, knowing nothing of call_bad.
    upstream.push(completion(content="done"))
    turn = [
        *MSGS,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "call_ok", "content": "42"},
    ]
    final = await client.chat.completions.create(model="m", messages=turn)
    assert final.choices[0].message.content == "done"
    sent = upstream.bodies()[1]["messages"]
    assistant = sent[1]
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_ok", "call_bad"]
    tool_msgs = {m["tool_call_id"]: m["content"] for m in sent if m["role"] == "tool"}
    assert tool_msgs["call_ok"] == "42"
    error = json.loads(tool_msgs["call_bad"])
    assert error["error"] == "tool_call_blocked" and error["gate"] == "rules"
    # Every call has exactly one result: the conversation is valid for OpenAI.
    assert len(sent) == 4 and sorted(tool_msgs) == ["call_bad", "call_ok"]


async def test_reprompt_all_blocked_asks_again(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(
        completion(
            ("bad", {}),
            ids=["call_1"],
            usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        ),
        completion(
            content="I cannot do that.",
            usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
        ),
    )
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.content == "I cannot do that."
    assert result.usage.total_tokens == 35  # both rounds are billed, so both are reported
    second = upstream.bodies()[1]["messages"]
    assert second[-2]["role"] == "assistant" and second[-2]["tool_calls"][0]["id"] == "call_1"
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == "call_1"
    assert json.loads(second[-1]["content"])["gate"] == "rules"


async def test_reprompt_bounded_by_max_reprompts(make_proxy, upstream):
    proxy = await make_proxy({"max_reprompts": 2, "tools": {"bad": {"allow": False}}})
    seen = records(proxy)
    for i in range(3):
        upstream.push(completion(("bad", {"n": i}), ids=[f"call_{i}"]))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert len(upstream.bodies()) == 3  # the first answer plus two reprompts, then strip
    assert result.choices[0].message.tool_calls is None
    assert result.choices[0].finish_reason == "stop"
    assert [r["action"] for r in seen] == ["reprompt", "reprompt", "strip"]


async def test_memory_store_forgets_stale_principals(clock):
    from proxy.store import SlotRequest
    from proxy.store.memory import SWEEP_EVERY, MemoryStore

    store = MemoryStore(clock=clock)
    for i in range(SWEEP_EVERY - 1):
        await store.reserve([SlotRequest(f"rl:tools:t@p{i}", 5, 60.0, 0.0)])
    await store.put_stash("stash:chat:x", b"{}", 10)
    assert len(store._logs) == SWEEP_EVERY - 1
    clock.advance(60)  # every entry is now exactly one window old: stale
    await store.reserve([SlotRequest("rl:tools:t@fresh", 5, 60.0, 0.0)])
    assert list(store._logs) == ["rl:tools:t@fresh"]
    assert await store.get_stash_many(["stash:chat:x"]) == [None]


async def test_hide_denied_tools_removes_them_from_the_request(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "server": {"hide_denied_tools": True},
            "default": {"allow": False},
            "tools": {"get_weather": {}, "delete_file": {"allow": False}},
        }
    )
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "delete_file", "unlisted")
    ]
    upstream.push(completion(content="hi"), completion(content="hi"))
    client = proxy.client()
    await client.chat.completions.create(
        model="m",
        messages=MSGS,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "delete_file"}},
    )
    sent = upstream.bodies()[0]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["tool_choice"] == "auto"  # it named a hidden tool
    await client.chat.completions.create(
        model="m", messages=MSGS, tools=tools[1:], parallel_tool_calls=False
    )
    assert {"tools", "tool_choice", "parallel_tool_calls"}.isdisjoint(upstream.bodies()[1])
