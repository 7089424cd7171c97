"""Arguments of any depth are decided and audited: too deep is `invalid_arguments`, never a crash.

Arguments nested 253+ levels deep used to fail the request (500, an `internal_error` event, or a
delivered call followed by an error) and to break the audit file's batch write for other
requests. Each API and mode is attacked here with a deep call beside a normal one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from proxy.audit import verify_file
from proxy.gates.arguments import MAX_ARGUMENT_DEPTH, nesting_exceeds
from tests.conftest import SSE, completion, records
from tests.responses_streams import FakeResponses, fc, response
from tests.streams import chat_stream

MSGS = [{"role": "user", "content": "hi"}]
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("ok", "deep")
]
RTOOLS = [{"type": "function", "name": n, "parameters": {"type": "object"}} for n in ("ok", "deep")]


def deep(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def config(tmp_path: Any) -> dict[str, Any]:
    return {
        "on_block": "strip",
        "audit": {"file": str(tmp_path / "audit.jsonl"), "redact": ["secret"]},
        "tools": {"deep": {"rules": [{"name": "r", "deny_if": "false"}]}},
    }


def test_nesting_walk_is_iterative_and_exact():
    flat = {"a": 1, "b": "x"}
    assert not nesting_exceeds(flat, 1)
    assert nesting_exceeds({"a": {"b": 1}}, 1) and not nesting_exceeds({"a": {"b": 1}}, 2)
    assert nesting_exceeds([[[]]], 2) and not nesting_exceeds([[[]]], 3)
    assert nesting_exceeds(json.loads(deep(900)), MAX_ARGUMENT_DEPTH)  # no RecursionError
    assert not nesting_exceeds(json.loads(deep(MAX_ARGUMENT_DEPTH - 1)), MAX_ARGUMENT_DEPTH)


@pytest.mark.parametrize("levels", [MAX_ARGUMENT_DEPTH + 1, 300, 600, 5000])
async def test_chat_deep_call_blocked_and_audited(make_proxy, upstream, tmp_path, levels):
    proxy = await make_proxy(config(tmp_path))
    seen = records(proxy)
    upstream.push(completion(("deep", deep(levels)), ("ok", {"a": 1}), ids=["c_deep", "c_ok"]))
    out = await proxy.client().chat.completions.create(model="m", messages=MSGS, tools=TOOLS)
    assert [c.id for c in out.choices[0].message.tool_calls] == ["c_ok"]
    by_id = {r["call_id"]: r for r in seen}
    assert by_id["c_deep"]["decision"] == "blocked"
    assert by_id["c_deep"]["reason"] == "invalid_arguments"
    assert by_id["c_ok"]["decision"] == "allowed"
    await proxy.state.auditor.close()
    count, problem = verify_file(str(tmp_path / "audit.jsonl"))[:2]
    assert problem is None and count == 2


async def test_chat_stream_deep_call_blocked_and_audited(make_proxy, upstream, tmp_path):
    proxy = await make_proxy(config(tmp_path))
    seen = records(proxy)
    upstream.push(SSE(chat_stream(("deep", deep(300)), ("ok", {"a": 1}), ids=["c_deep", "c_ok"])))
    async with proxy.client().chat.completions.stream(
        model="m", messages=MSGS, tools=TOOLS
    ) as stream:
        final = await stream.get_final_completion()
    assert [c.id for c in final.choices[0].message.tool_calls] == ["c_ok"]
    assert {(r["call_id"], r["decision"], r["reason"]) for r in seen} == {
        ("c_deep", "blocked", "invalid_arguments"),
        ("c_ok", "allowed", None),
    }


async def test_responses_deep_call_blocked_and_audited(make_proxy, upstream, tmp_path):
    proxy = await make_proxy(config(tmp_path))
    seen = records(proxy)
    api = FakeResponses()
    body = response(fc("deep", json.loads(deep(300)), "c_deep"), fc("ok", {"a": 1}, "c_ok"))
    upstream.push(api.reply(body))
    out = await proxy.client().responses.create(model="m", input="hi", tools=RTOOLS)
    assert [o.call_id for o in out.output if o.type == "function_call"] == ["c_ok"]
    assert {(r["call_id"], r["decision"], r["reason"]) for r in seen} == {
        ("c_deep", "blocked", "invalid_arguments"),
        ("c_ok", "allowed", None),
    }


async def test_responses_stream_deep_call_never_delivered(make_proxy, upstream, tmp_path):
    proxy = await make_proxy(config(tmp_path))
    seen = records(proxy)
    api = FakeResponses()
    body = response(fc("deep", json.loads(deep(300)), "c_deep"), fc("ok", {"a": 1}, "c_ok"))
    upstream.push(api.reply(body))
    types: list[str] = []
    delivered: list[str] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/responses",
            json={"model": "m", "input": "hi", "tools": RTOOLS, "stream": True},
        ) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                types.append(event["type"])
                item = event.get("item") or {}
                if event["type"] == "response.output_item.done" and "call_id" in item:
                    delivered.append(item["call_id"])
    assert delivered == ["c_ok"]
    assert "error" not in types and types[-1] == "response.completed"
    assert {(r["call_id"], r["decision"], r["reason"]) for r in seen} == {
        ("c_deep", "blocked", "invalid_arguments"),
        ("c_ok", "allowed", None),
    }


async def test_deep_calls_do_not_cost_other_requests_their_records(make_proxy, upstream, tmp_path):
    """One unrepresentable record never takes other records down with it."""
    proxy = await make_proxy(config(tmp_path))
    client = proxy.client()
    n = 40

    def reply(rec: Any) -> dict[str, Any]:
        i = rec.body["metadata"]["i"]
        if int(i) % 4 == 0:
            return completion(("deep", deep(300)), ids=[f"deep_{i}"])
        return completion(("ok", {"secret": "s", "n": [[[i]]]}), ids=[f"ok_{i}"])

    upstream.push(*([reply] * n))
    outs = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="m", messages=MSGS, tools=TOOLS, metadata={"i": str(i)}
            )
            for i in range(n)
        )
    )
    delivered = {c.id for o in outs for c in (o.choices[0].message.tool_calls or [])}
    assert delivered == {f"ok_{i}" for i in range(n) if i % 4}
    await proxy.state.auditor.close()
    path = tmp_path / "audit.jsonl"
    count, problem = verify_file(str(path))[:2]
    assert problem is None and count == n
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    on_file = {r["call_id"]: r for r in lines}
    assert set(on_file) == delivered | {f"deep_{i}" for i in range(0, n, 4)}
    assert all(on_file[c]["arguments"]["secret"] == "[REDACTED]" for c in delivered)


async def test_huge_arguments_are_decided_and_their_log_line_is_bounded(make_proxy, upstream):
    from structlog.testing import capture_logs

    proxy = await make_proxy({"on_block": "strip", "audit": {"log": True}})
    huge = {"blob": "x" * 3_000_000}
    upstream.push(completion(("ok", huge), ids=["c_huge"]))
    with capture_logs() as logs:
        out = await proxy.client().chat.completions.create(model="m", messages=MSGS, tools=TOOLS)
    assert [c.id for c in out.choices[0].message.tool_calls] == ["c_huge"]
    [line] = [e for e in logs if e.get("event") == "tool_call_decision"]
    logged = line["arguments"]
    assert logged["bytes"] == len(json.dumps(huge)) and len(logged["preview"]) <= 1024
    assert len(json.dumps(line, default=str)) < 4096
