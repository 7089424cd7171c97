"""Non-streaming Responses API through callgate, with the real openai SDK as the client."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import records
from tests.redis_server import redis_server_fixture  # noqa: F401
from tests.responses_streams import USAGE, FakeResponses, ctc, fc, msg, response, rs

TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("ok", "bad", "get_weather")
]
BAD = {"tools": {"bad": {"allow": False}}}


def types(resp: Any) -> list[str]:
    return [o.type for o in resp.output]


def call_ids(resp: Any) -> list[str]:
    return [o.call_id for o in resp.output if o.type in ("function_call", "custom_tool_call")]


async def test_allowed_call_passes_byte_for_byte(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    body = response(msg("Let me check."), fc("get_weather", {"city": "Paris"}))
    upstream.push(api.reply(body))
    raw = await proxy.client().responses.with_raw_response.create(
        model="m", input="weather?", tools=TOOLS
    )
    assert json.loads(raw.http_response.content) == {**body, "previous_response_id": None}
    result = raw.parse()
    assert types(result) == ["message", "function_call"]
    assert json.loads(result.output[1].arguments) == {"city": "Paris"}
    assert result.output_text == "Let me check."


async def test_one_of_two_blocked_then_previous_response_id_turn(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    seen = records(proxy)
    api = FakeResponses()
    first = response(fc("ok", {"a": 1}, "c_ok"), fc("bad", {"b": 2}, "c_bad"))
    upstream.push(api.reply(first), api.reply(response(msg("done"))))
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="hi", tools=TOOLS)
    assert call_ids(r1) == ["c_ok"]  # reprompt mode, partial: dropped silently
    assert r1.output_text == ""
    assert r1.id == first["id"]
    assert {(r["tool"], r["decision"], r["action"]) for r in seen} == {
        ("ok", "allowed", None),
        ("bad", "blocked", "drop+stash"),
    }
    r2 = await client.responses.create(
        model="m",
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": "c_ok", "output": "42"}],
        tools=TOOLS,
    )
    assert r2.output_text == "done"
    sent = upstream.bodies("/v1/responses")[1]["input"]
    outputs = {i["call_id"]: i["output"] for i in sent}
    assert outputs["c_ok"] == "42"
    error = json.loads(outputs["c_bad"])
    assert error["error"] == "tool_call_blocked" and error["gate"] == "rules"
    assert error["reason"] == "tool_not_allowed"


async def test_fake_upstream_rejects_a_missing_output_like_openai(upstream):
    """The scripted upstream's rule, checked on its own: no proxy in between."""
    api = FakeResponses()
    first = response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"))
    upstream.push(api.reply(first), api.reply(response(msg("never"))))
    client = openai.AsyncOpenAI(base_url=upstream.url, api_key="sk-test", max_retries=0)
    r1 = await client.responses.create(model="m", input="hi")
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(
            model="m",
            previous_response_id=r1.id,
            input=[{"type": "function_call_output", "call_id": "c_ok", "output": "42"}],
        )
    assert err.value.body["message"] == "No tool output found for function call c_bad."


async def test_full_input_turn_reinserts_blocked_call_in_place(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    first = response(rs(), fc("bad", {}, "c_bad"), fc("ok", {}, "c_ok"))
    upstream.push(api.reply(first), api.reply(response(msg("done"))))
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="hi", tools=TOOLS)
    # The reasoning item went with the blocked call that followed it.
    assert types(r1) == ["function_call"] and call_ids(r1) == ["c_ok"]
    history = [
        {"role": "user", "content": "hi"},
        *[o.model_dump(exclude_none=True) for o in r1.output],
        {"type": "function_call_output", "call_id": "c_ok", "output": "1"},
    ]
    r2 = await client.responses.create(model="m", input=history, tools=TOOLS, store=False)
    assert r2.output_text == "done"
    sent = upstream.bodies("/v1/responses")[1]["input"]
    kinds = [(i.get("type", "message"), i.get("call_id")) for i in sent]
    assert kinds == [
        ("message", None),
        ("reasoning", None),
        ("function_call", "c_bad"),
        ("function_call_output", "c_bad"),
        ("function_call", "c_ok"),
        ("function_call_output", "c_ok"),
    ]
    # Sending the same history again does not repeat anything.
    upstream.push(api.reply(response(msg("again"))))
    await client.responses.create(model="m", input=[*history], tools=TOOLS, store=False)
    assert len(upstream.bodies("/v1/responses")[2]["input"]) == 6


async def test_all_blocked_reprompt_with_previous_response_id(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    seen = records(proxy)
    api = FakeResponses()
    first = response(fc("bad", {"x": 1}, "c1"))
    upstream.push(
        api.reply(first),
        api.reply(response(msg("I cannot do that."), usage={**USAGE, "total_tokens": 20})),
    )
    result = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert result.output_text == "I cannot do that."
    assert types(result) == ["message"]
    assert result.usage.total_tokens == 35  # both rounds are billed, so both are reported
    assert result.usage.input_tokens == 20
    assert result.previous_response_id is None  # what the client asked, not callgate's round
    second = upstream.bodies("/v1/responses")[1]
    assert second["previous_response_id"] == first["id"]
    assert second["tools"] == TOOLS and second["model"] == "m"
    [out] = second["input"]
    assert out["type"] == "function_call_output" and out["call_id"] == "c1"
    assert json.loads(out["output"])["gate"] == "rules"
    assert [r["action"] for r in seen] == ["reprompt"]


async def test_reprompt_without_store_replays_full_input(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    upstream.push(
        api.reply(response(rs(), msg("Trying."), fc("bad", {}, "c1"))),
        api.reply(response(msg("Fine."))),
    )
    result = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS, store=False)
    assert result.output_text == "Fine."
    second = upstream.bodies("/v1/responses")[1]
    assert "previous_response_id" not in second
    kinds = [(i.get("type", "message"), i.get("call_id")) for i in second["input"]]
    # The reasoning item (no encrypted_content, nothing stored) cannot be replayed.
    assert kinds == [
        ("message", None),
        ("message", None),
        ("function_call", "c1"),
        ("function_call_output", "c1"),
    ]


async def test_reprompt_bounded_then_strip(make_proxy, upstream):
    proxy = await make_proxy({"max_reprompts": 1, **BAD})
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("bad", {}, "c1"))), api.reply(response(fc("bad", {}, "c2")))
    )
    result = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert len(upstream.bodies("/v1/responses")) == 2
    assert types(result) == ["message"]
    assert result.output_text.startswith("[callgate] blocked tool call: bad")
    assert result.status == "completed"
    assert [r["action"] for r in seen] == ["reprompt", "strip"]
    # The stripped call's error output goes with the next turn (the upstream stored the call).
    upstream.push(api.reply(response(msg("ok"))))
    await proxy.client().responses.create(
        model="m", previous_response_id=result.id, input="and now?", tools=TOOLS
    )
    third = upstream.bodies("/v1/responses")[2]["input"]
    assert [i.get("call_id") for i in third] == ["c2", None]


async def test_custom_tool_rule_on_input(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "tools": {
                "shell": {"rules": [{"name": "no_rm", "deny_if": 'args.input.contains("rm -rf")'}]}
            },
        }
    )
    api = FakeResponses()
    upstream.push(
        api.reply(response(msg("Running it."), ctc("shell", "rm -rf /", "c_sh"))),
        api.reply(response(ctc("shell", "ls -la", "c_ls"))),
    )
    client = proxy.client()
    tools = [{"type": "custom", "name": "shell"}]
    blocked = await client.responses.create(model="m", input="clean up", tools=tools)
    assert types(blocked) == ["message", "message"]
    assert blocked.output_text == (
        "Running it.\n\n[callgate] blocked tool call: shell (Policy violation: no_rm)"
    )
    allowed = await client.responses.create(model="m", input="list", tools=tools)
    assert allowed.output[0].type == "custom_tool_call" and allowed.output[0].input == "ls -la"


async def test_error_mode_permission_denied(make_proxy, upstream):
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
    api = FakeResponses()
    upstream.push(api.reply(response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"))))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert err.value.status_code == 403
    assert err.value.body["code"] == "rules" and err.value.body["type"] == "tool_call_blocked"
    assert {(r["tool"], r["decision"]) for r in seen} == {("ok", "withheld"), ("bad", "blocked")}
    upstream.push(api.reply(response(fc("ok", {}, "c_ok2"))))  # the withheld slot was given back
    again = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert call_ids(again) == ["c_ok2"]


async def test_get_stored_response_and_input_items_hide_blocked(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    first = response(rs(), fc("bad", {}, "c_bad"), fc("ok", {}, "c_ok"))
    upstream.push(api.reply(first))
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="hi", tools=TOOLS)
    upstream.push(api.get, api.reply(response(msg("done"))))
    got = await client.responses.retrieve(r1.id)
    assert types(got) == ["function_call"] and call_ids(got) == ["c_ok"]
    r2 = await client.responses.create(
        model="m",
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": "c_ok", "output": "1"}],
    )
    upstream.push(api.get)
    items = await client.responses.input_items.list(r2.id)
    assert [(i.type, i.call_id) for i in items.data] == [("function_call_output", "c_ok")]
    # What the upstream holds does include the error output.
    assert {i["call_id"] for i in api.inputs[r2.id]} == {"c_ok", "c_bad"}
    # A response with nothing of ours in it is forwarded verbatim.
    upstream.push(api.get)
    plain = await client.responses.retrieve(r2.id)
    assert plain.output_text == "done"


async def test_get_after_reprompt_shows_the_clients_view(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    upstream.push(api.reply(response(fc("bad", {}, "c1"))), api.reply(response(msg("Sorry."))))
    client = proxy.client()
    result = await client.responses.create(model="m", input="hi", tools=TOOLS)
    upstream.push(api.get)
    got = await client.responses.retrieve(result.id)
    assert got.previous_response_id is None and got.output_text == "Sorry."
    upstream.push(api.get)
    items = await client.responses.input_items.list(result.id)
    # The client's own input, not callgate's reprompt turn.
    assert [(i.type, getattr(i, "role", None)) for i in items.data] == [("message", "user")]


async def test_server_side_tools_removed_by_policy(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "tools": {
                "web_search": {"allow": False},
                "mcp:evil": {"allow": False},
                "code_interpreter": {"allow": True},
            }
        }
    )
    api = FakeResponses()
    upstream.push(api.reply(response(msg("hi"))))
    await proxy.client().responses.create(
        model="m",
        input="hi",
        tools=[
            {"type": "web_search_preview"},
            {"type": "mcp", "server_label": "evil", "server_url": "https://evil.example"},
            {"type": "mcp", "server_label": "good", "server_url": "https://good.example"},
            {"type": "code_interpreter", "container": {"type": "auto"}},
            TOOLS[0],
        ],
        tool_choice={"type": "web_search_preview"},
    )
    sent = upstream.bodies("/v1/responses")[0]
    assert [t.get("server_label", t["type"]) for t in sent["tools"]] == [
        "good",
        "code_interpreter",
        "function",
    ]
    assert sent["tool_choice"] == "auto"


async def test_deny_by_default_removes_unlisted_server_tools(make_proxy, upstream):
    proxy = await make_proxy({"default": {"allow": False}, "tools": {"ok": {}}})
    api = FakeResponses()
    upstream.push(api.reply(response(msg("hi"))))
    await proxy.client().responses.create(
        model="m", input="hi", tools=[{"type": "web_search"}, TOOLS[0]]
    )
    sent = upstream.bodies("/v1/responses")[0]
    assert sent["tools"] == [TOOLS[0]]


async def test_background_with_tools_is_refused(make_proxy, upstream):
    proxy = await make_proxy({})
    with pytest.raises(openai.BadRequestError) as err:
        await proxy.client().responses.create(model="m", input="hi", tools=TOOLS, background=True)
    assert err.value.body["param"] == "background"
    assert upstream.received == []


async def test_upstream_error_passes_unchanged(make_proxy, upstream):
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
        await proxy.client().responses.create(model="m", input="hi")
    assert err.value.response.headers["retry-after"] == "3"


async def test_other_responses_routes_pass_through(make_proxy, upstream):
    proxy = await make_proxy({})
    upstream.push(
        {"id": "resp_1", "object": "response", "deleted": True},
        response(msg("x"), rid="resp_2", status="cancelled"),
    )
    client = proxy.client()
    await client.responses.delete("resp_1")
    cancelled = await client.responses.cancel("resp_2")
    assert cancelled.status == "cancelled"
    assert [(r.method, r.path) for r in upstream.received] == [
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_2/cancel"),
    ]


async def test_stash_in_redis_completes_the_next_turn(make_proxy, upstream, redis_server):
    proxy = await make_proxy({**BAD, "store": {"backend": "redis", "url": redis_server.url}})
    api = FakeResponses()
    upstream.push(api.reply(response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"))))
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="hi", tools=TOOLS)
    assert call_ids(r1) == ["c_ok"]
    upstream.push(api.reply(response(msg("done"))))
    r2 = await client.responses.create(
        model="m",
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": "c_ok", "output": "1"}],
    )
    assert r2.output_text == "done"


async def test_conversation_next_turn_carries_the_blocked_output(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"))),
        api.reply(response(msg("done"))),
        api.reply(response(msg("later"))),
    )
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="hi", tools=TOOLS, conversation="conv_1")
    assert call_ids(r1) == ["c_ok"]
    ok = {"type": "function_call_output", "call_id": "c_ok", "output": "1"}
    await client.responses.create(model="m", input=[ok], conversation="conv_1")
    await client.responses.create(model="m", input="more", conversation={"id": "conv_1"})
    sent = upstream.bodies("/v1/responses")
    assert [i["call_id"] for i in sent[1]["input"]] == ["c_bad", "c_ok"]
    assert sent[2]["input"] == "more"  # carried once: the conversation holds it now
