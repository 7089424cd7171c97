"""Redis stopped under a running callgate: each gate follows on_store_error, /readyz says not
ready, nothing crashes and no audit record is lost; Redis back on the same port: decisions
resume without restarting callgate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from proxy.audit import verify_file
from tests.conftest import completion
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

MSGS = [{"role": "user", "content": "hi"}]


def config(url: str, audit_file: str) -> dict[str, Any]:
    closed = {"max_calls": 100, "window": 60}
    return {
        "on_block": "strip",
        "store": {"backend": "redis", "url": url, "timeout": 0.2},
        "audit": {"log": False, "file": audit_file},
        "budgets": {"b": {"max_spend": "10.00", "window": 3600}},
        "tools": {
            "rl_closed": {"rate_limit": closed},
            "rl_open": {"rate_limit": {**closed, "on_store_error": "fail_open"}},
            "pay_closed": {"budget": {"ledger": "b", "cost": "0.01"}},
            "pay_open": {"budget": {"ledger": "b", "cost": "0.01", "on_store_error": "fail_open"}},
        },
    }


async def get_status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


async def test_redis_outage_through_the_proxy(make_proxy, upstream, redis_server, tmp_path):
    audit_file = str(tmp_path / "audit.jsonl")
    proxy = await make_proxy(config(redis_server.url, audit_file))
    seen: list[dict[str, Any]] = []
    proxy.state.auditor.listeners.append(seen.append)
    client = proxy.client()

    async def ask(*tools: str, messages: list[Any] = MSGS) -> Any:
        upstream.push(completion(*((t, {}) for t in tools), ids=[f"call_{t}" for t in tools]))
        started = time.monotonic()
        result = await client.chat.completions.create(model="m", messages=messages)
        assert time.monotonic() - started < 2.0  # a dead store costs about its timeout
        calls = result.choices[0].message.tool_calls or []
        return [c.function.name for c in calls]

    # Redis up: everything passes.
    assert await get_status(proxy.root + "/readyz") == 200
    for tool in ("rl_closed", "rl_open", "pay_closed", "pay_open"):
        assert await ask(tool) == [tool]
    assert all(r["decision"] == "allowed" and r["fail_open"] == [] for r in seen)

    redis_server.stop()
    del seen[:]
    assert await ask("rl_closed") == []
    assert await ask("pay_closed") == []
    assert await ask("rl_open") == ["rl_open"]
    assert await ask("pay_open") == ["pay_open"]
    blocked = [r for r in seen if r["decision"] == "blocked"]
    assert [(r["tool"], r["gate"], r["reason"]) for r in blocked] == [
        ("rl_closed", "rate_limit", "store_error"),
        ("pay_closed", "budget", "store_error"),
    ]
    assert blocked[0]["message"].startswith("Store unavailable: redis")
    allowed = [r for r in seen if r["decision"] == "allowed"]
    assert [(r["tool"], r["fail_open"]) for r in allowed] == [
        ("rl_open", ["rate_limit"]),
        ("pay_open", ["budget"]),
    ]
    # A partial block wants to stash (write fails), a next turn wants the stash (read fails):
    # both are logged, the requests are still answered.
    assert await ask("rl_open", "rl_closed") == ["rl_open"]
    turn = [
        *MSGS,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_rl_open",
                    "type": "function",
                    "function": {"name": "rl_open", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_rl_open", "content": "ok"},
    ]
    assert await ask("rl_open", messages=turn) == ["rl_open"]
    assert await get_status(proxy.root + "/readyz") == 503
    assert await get_status(proxy.root + "/healthz") == 200

    # Redis back (empty, same port): decisions resume, no restart of callgate.
    redis_server.start()
    assert await get_status(proxy.root + "/readyz") == 200
    del seen[:]
    assert await ask("rl_closed") == ["rl_closed"]
    assert await ask("pay_closed") == ["pay_closed"]
    assert [(r["decision"], r["fail_open"]) for r in seen] == [("allowed", []), ("allowed", [])]

    # Every decision is in the hash-chained audit file.
    total = proxy.state.auditor.records
    assert total == 4 + 4 + 2 + 1 + 2
    deadline = time.monotonic() + 3
    while True:
        count, problem = verify_file(audit_file)
        if count == total or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert (count, problem) == (total, None)


async def test_error_mode_rollback_on_redis(make_proxy, upstream, redis_server):
    """An error-mode block gives the other calls' slots back, in Redis too."""
    cfg = {
        "on_block": "error",
        "store": {"backend": "redis", "url": redis_server.url, "timeout": 0.2},
        "tools": {
            "a": {"rate_limit": {"max_calls": 1, "window": 60}},
            "bad": {"allow": False},
        },
    }
    proxy = await make_proxy(cfg)
    client = proxy.client()
    upstream.push(completion(("a", {}), ("bad", {})))
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="m", messages=MSGS)
    # The slot of "a" was given back: it is still free, exactly once.
    upstream.push(completion(("a", {})))
    result = await client.chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.tool_calls[0].function.name == "a"
    upstream.push(completion(("a", {})))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await client.chat.completions.create(model="m", messages=MSGS)
    assert err.value.body["code"] == "rate_limit"
