"""Edge cases found in review: each test once failed against the code it now guards."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from proxy.app import create_app
from proxy.policy import load_policy
from proxy.reload import watch
from proxy.state import STATE
from tests.conftest import SSE, completion, records
from tests.streams import chunk
from tests.test_operations import write_policy

MSGS = [{"role": "user", "content": "hi"}]


def call(i: int, cid: str, name: str, args: str) -> dict[str, Any]:
    return chunk(
        {
            "tool_calls": [
                {
                    "index": i,
                    "id": cid,
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }
            ]
        }
    )


async def test_upstream_error_event_mid_call_is_audited(make_proxy, upstream):
    # Call 0 is decided (allowed, emitted) when call 1 starts; then the upstream sends its own
    # error event while call 1 is held. DESIGN: every decision is one audit record; the held
    # call fails closed "and the audit record says why".
    proxy = await make_proxy({})
    seen = records(proxy)
    err = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
    upstream.push(
        SSE(
            [
                chunk({"role": "assistant", "content": None}),
                call(0, "c0", "ok", "{}"),
                call(1, "c1", "ok", '{"a":'),
                err,
            ],
            done=False,
        )
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert sorted((r["call_id"], r["decision"]) for r in seen) == [
        ("c0", "allowed"),
        ("c1", "blocked"),
    ]


async def test_usage_on_finish_chunk_is_kept(make_proxy, upstream):
    # Mistral, DeepSeek, older llama.cpp and vLLM (continuous_usage_stats) put `usage` on the
    # chunk that carries finish_reason. That chunk is always re-encoded, and chunk() nulls usage.
    proxy = await make_proxy({})
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    upstream.push(
        SSE([chunk({"role": "assistant", "content": "Hi"}), {**chunk({}, "stop"), "usage": usage}])
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    seen_usage = None
    async for ch in stream:
        seen_usage = ch.usage or seen_usage
    assert seen_usage is not None and seen_usage.total_tokens == 5


async def test_stream_answered_with_json_is_not_gated(make_proxy, upstream):
    # An upstream that ignores stream:true and answers 200 application/json is relayed
    # verbatim: the denied call reaches the client ungated (fail open).
    proxy = await make_proxy({"tools": {"delete_file": {"allow": False}}})
    upstream.push(completion(("delete_file", {"path": "/"})))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/chat/completions",
            json={"model": "m", "messages": MSGS, "stream": True},
        ) as resp,
    ):
        body = await resp.read()
    assert b"delete_file" not in body


async def test_error_mode_stream_sends_no_call_and_refunds_it(make_proxy, upstream):
    # `ok` (max_calls 1) completes first, then `bad` (error mode) blocks the response. Once
    # refunded, ok's call must not have reached the client: with an error-mode tool in the
    # policy, allowed calls wait until the response is settled.
    proxy = await make_proxy(
        {
            "on_block": "error",
            "tools": {
                "ok": {"rate_limit": {"max_calls": 1, "window": 60}},
                "bad": {"allow": False},
            },
        }
    )
    upstream.push(
        SSE(
            [
                chunk({"role": "assistant", "content": None}),
                call(0, "c_ok", "ok", "{}"),
                call(1, "c_bad", "bad", "{}"),
                chunk({}, "tool_calls"),
            ]
        ),
        completion(("ok", {}), ids=["c_ok2"]),
    )
    client = proxy.client()
    got = []
    stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError):
        async for ch in stream:
            for c in ch.choices:
                got += [tc.id for tc in c.delta.tool_calls or []]
    assert got == []  # the failed response sent none of its calls
    # ...so its slot was rightly given back: the next `ok` gets it.
    result = await client.chat.completions.create(model="m", messages=MSGS)
    assert [c.id for c in result.choices[0].message.tool_calls] == ["c_ok2"]


async def test_watcher_survives_non_utf8_policy(tmp_path, aiohttp_server, upstream):
    path = tmp_path / "callgate.yaml"
    write_policy(path, {"a": {"allow": False}}, upstream.url)
    app = create_app(load_policy(str(path)), config_path=str(path))
    await aiohttp_server(app, host="127.0.0.1")
    state = app[STATE]
    watcher = asyncio.create_task(watch(state, 0.02))
    try:
        await asyncio.sleep(0.05)
        path.write_bytes(b"# caf\xe9 policy\ntools: {}\n")  # saved as latin-1 by an editor
        await asyncio.sleep(0.1)
        write_policy(path, {"b": {"allow": False}}, upstream.url)  # fixed a moment later
        for _ in range(50):
            if "b" in state.policy.tools:
                break
            await asyncio.sleep(0.02)
        assert not watcher.done(), watcher.exception()
        assert "b" in state.policy.tools
    finally:
        watcher.cancel()


async def test_unresolvable_schema_ref_fails_closed_not_500(make_proxy, upstream):
    # `callgate check` accepts this schema; at call time jsonschema raises
    # _WrappedReferencingError, which escapes decide() and the request becomes a 500.
    proxy = await make_proxy(
        {"on_block": "error", "tools": {"t": {"arguments_schema": {"$ref": "#/$defs/nope"}}}}
    )
    upstream.push(completion(("t", {})))
    try:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    except openai.PermissionDeniedError as exc:
        assert exc.body["code"] == "rules"
    else:
        raise AssertionError("the call was allowed")


async def test_legacy_mirror_of_blocked_call_survives_partial_strip(make_proxy, upstream):
    # Servers that mirror the first tool call as legacy `function_call` (the case strip_calls
    # handles when *no* call is left): with a partial block the mirror is kept, so a client
    # reading `function_call` still gets the blocked call.
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    body = completion(("bad", {"p": "/"}), ("ok", {}), ids=["c_bad", "c_ok"])
    body["choices"][0]["message"]["function_call"] = {"name": "bad", "arguments": '{"p": "/"}'}
    upstream.push(body)
    r = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    msg = r.choices[0].message
    assert [c.id for c in msg.tool_calls] == ["c_ok"]
    assert msg.function_call is None or msg.function_call.name != "bad"


async def test_without_error_mode_calls_stream_before_the_finish(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip"})
    seen = records(proxy)
    # The first call is complete once the second starts; the stream then breaks.
    upstream.push(SSE([call(0, "c0", "ok", "{}"), call(1, "c1", "ok", '{"a":')], done=False))
    got = []
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError):
        async for ch in stream:
            for c in ch.choices:
                got += [tc.id for tc in c.delta.tool_calls or []]
    assert got == ["c0"]
    assert sorted((r["call_id"], r["decision"]) for r in seen) == [
        ("c0", "allowed"),
        ("c1", "blocked"),
    ]


async def test_stash_is_scoped_to_the_principal(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    upstream.push(completion(("ok", {}), ("bad", {"secret": 1}), ids=["c_ok", "c_bad"]))
    await proxy.client(default_headers={"x-callgate-principal": "alice"}).chat.completions.create(
        model="m", messages=MSGS
    )
    upstream.push(completion(content="hi"))
    replay = [
        *MSGS,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c_ok", "type": "function", "function": {"name": "ok", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c_ok", "content": "1"},
    ]
    await proxy.client(default_headers={"x-callgate-principal": "mallory"}).chat.completions.create(
        model="m", messages=replay
    )
    assert "secret" not in str(upstream.bodies()[1])


async def test_duplicate_call_ids_are_stripped_by_position(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    upstream.push(completion(("ok", {}), ("bad", {}), ids=["", ""]))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert [c.function.name for c in result.choices[0].message.tool_calls] == ["ok"]


async def test_malformed_call_shapes_do_not_500(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    body = completion(("ok", {}))
    body["choices"][0]["message"]["tool_calls"] = [
        {"id": "c1", "type": "function", "function": "bad"},
        {"id": "c2", "type": "function", "function": {"name": "bad", "arguments": {"a": 1}}},
        "junk",
    ]
    upstream.push(body)
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.content.startswith("[callgate] blocked tool call")


@pytest.mark.parametrize(
    "ledger,cost,message",
    [
        ({"max_spend": "1", "window": 0}, "0.1", "window must be positive"),
        ({"max_spend": "1"}, "0.0000001", "more than 6 decimal places"),
        ({"max_spend": "1"}, "-1", "non-negative"),
        ({"max_spend": "1e30"}, "0.1", "must be below"),
    ],
)
def test_budget_amount_errors_are_config_errors(tmp_path, capsys, ledger, cost, message):
    import yaml

    from proxy.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {"budgets": {"b": ledger}, "tools": {"t": {"budget": {"ledger": "b", "cost": cost}}}}
        )
    )
    assert main(["check", str(path)]) == 1
    assert message in capsys.readouterr().err


async def test_usage_is_summed_with_nested_details(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    upstream.push(completion(("bad", {}), usage=usage), completion(content="ok", usage=usage))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.usage.total_tokens == 24
    assert result.usage.completion_tokens_details.reasoning_tokens == 2


async def test_held_calls_refunded_when_an_error_mode_stream_breaks(make_proxy, upstream):
    # Error mode in the policy holds allowed calls until the finish; the stream breaks first.
    proxy = await make_proxy(
        {
            "tools": {
                "ok": {"rate_limit": {"max_calls": 1, "window": 60}},
                "bad": {"allow": False, "on_block": "error"},
            }
        }
    )
    seen = records(proxy)
    upstream.push(
        SSE([call(0, "c0", "ok", "{}"), call(1, "c1", "ok", '{"a":')], done=False),
        completion(("ok", {}), ids=["c2"]),
    )
    client = proxy.client()
    stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
    got = []
    with pytest.raises(openai.APIError):
        async for ch in stream:
            for c in ch.choices:
                got += [tc.id for tc in c.delta.tool_calls or []]
    assert got == []
    assert sorted((r["call_id"], r["decision"]) for r in seen) == [
        ("c0", "blocked"),
        ("c1", "blocked"),
    ]
    await asyncio.sleep(0)  # the refund runs as its own task
    result = await client.chat.completions.create(model="m", messages=MSGS)
    assert [c.id for c in result.choices[0].message.tool_calls] == ["c2"]


async def test_client_disconnect_still_audits_decided_calls(make_proxy, upstream):
    proxy = await make_proxy({})
    seen = records(proxy)
    slow = SSE(
        [
            call(0, "c0", "ok", "{}"),
            call(1, "c1", "ok", "{}"),
            *[chunk({"content": "x"}) for _ in range(200)],
        ],
        delay=0.01,
    )
    # Text after the calls keeps the stream going; the client leaves after the first call.
    slow.events.insert(2, chunk({"tool_calls": [{"index": 1, "function": {"arguments": ""}}]}))
    upstream.push(slow)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url + "/chat/completions", json={"model": "m", "messages": MSGS, "stream": True}
        )
        first = await resp.content.readline()
        assert b'"c0"' in first
        resp.close()
    for _ in range(200):  # bounded: 2 s
        if slow.aborted and len(seen) == 2:
            break
        await asyncio.sleep(0.01)
    assert sorted((r["call_id"], r["decision"], r["action"]) for r in seen) == [
        ("c0", "allowed", None),  # recorded as it was sent, before the client left
        ("c1", "blocked", "client_disconnected"),
    ]


@pytest.mark.parametrize("text", ["Hello WÖRLD ÄbC 123", "ß", "İstanbul", "", "MiXeD-Case_42"])
def test_fast_ascii_case_functions_match_the_cel_extensions(text):
    from cel.stdlib import STDLIB_FUNCTIONS

    from proxy.policy import FUNCTIONS

    assert FUNCTIONS["lowerAscii"](text) == STDLIB_FUNCTIONS["lowerAscii"](text)
    assert FUNCTIONS["upperAscii"](text) == STDLIB_FUNCTIONS["upperAscii"](text)


async def test_legacy_mirror_that_differs_from_the_calls_is_gated(make_proxy, upstream):
    """A server's legacy `function_call` beside `tool_calls` naming another call (real
    llama-cpp-python does this) is what a legacy client runs: it is decided like any call."""
    proxy = await make_proxy({"on_block": "strip", "tools": {"delete_file": {"allow": False}}})
    seen = records(proxy)
    body = completion(("get_weather", {"city": "Paris"}), ids=["c1"])
    body["choices"][0]["message"]["function_call"] = {
        "name": "delete_file",
        "arguments": '{"path": "/"}',
    }
    upstream.push(body)
    out = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    message = out.choices[0].message
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert message.function_call is None  # the mismatching mirror was blocked and removed
    assert sorted((r["tool"], r["decision"]) for r in seen) == [
        ("delete_file", "blocked"),
        ("get_weather", "allowed"),
    ]


async def test_legacy_mirror_of_an_allowed_call_passes_unchanged(make_proxy, upstream):
    proxy = await make_proxy({"on_block": "strip", "tools": {"delete_file": {"allow": False}}})
    seen = records(proxy)
    body = completion(("get_weather", {"city": "Paris"}), ids=["c1"])
    call = body["choices"][0]["message"]["tool_calls"][0]["function"]
    body["choices"][0]["message"]["function_call"] = dict(call)
    upstream.push(body)
    out = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert out.choices[0].message.function_call.name == "get_weather"
    assert [(r["tool"], r["decision"]) for r in seen] == [("get_weather", "allowed")]
