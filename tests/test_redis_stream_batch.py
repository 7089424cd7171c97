"""A streamed response whose gate asks for several calls at once decides them in one Redis round
trip, each call still all-or-nothing and applying its own on_store_error.

Both stream gates decide the calls a read completes together (`decide_held`), and the
Responses gate the calls a terminal event's `output` carries that no item event announced
(`decide_unseen`). Counted on a real redis-server through INFO commandstats: the 8 calls of a
response read at once cost one EVALSHA.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.store.redis import RedisStore
from tests.conftest import SSE, records
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.responses_streams import fc, response, sse_event, stream_events
from tests.streams import chat_stream
from tests.test_redis_pipelining import evalsha_calls

TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("search", "closed", "open")
]


def unannounced(*items: dict[str, Any]) -> SSE:
    """A stream whose calls appear only in its terminal event (no item events)."""
    body = response(*items)
    shell = {**body, "status": "in_progress", "output": [], "usage": None}
    events = [
        {"type": "response.created", "response": shell},
        {"type": "response.in_progress", "response": shell},
        {"type": "response.completed", "response": body},
    ]
    for n, event in enumerate(events):
        event["sequence_number"] = n
    return SSE([sse_event(e) for e in events], done=False)


async def stream(proxy: Any) -> dict[str, Any]:
    """The streamed response's final object, as the client got it."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/responses",
            json={"model": "m", "input": "hi", "stream": True, "tools": TOOLS},
        ) as resp,
    ):
        assert resp.status == 200
        raw = await resp.read()
    finals = [
        json.loads(line[6:])
        for line in raw.decode().splitlines()
        if line.startswith("data: ") and '"response.completed"' in line
    ]
    assert len(finals) == 1, raw
    return finals[0]["response"]


def budget_policy(url: str) -> dict[str, Any]:
    """search: 6 calls per window, 0.30 each against 1.50: of 8 calls, 1-5 pass; the budget
    stops 6-8, and (all-or-nothing) they take no rate-limit slot either."""
    return {
        "on_block": "strip",
        "store": {"backend": "redis", "url": url},
        "budgets": {"b": {"max_spend": "1.50", "window": 3600, "scope": "global"}},
        "tools": {
            "search": {
                "rate_limit": {"max_calls": 6, "window": 60, "scope": "global"},
                "budget": {"ledger": "b", "cost": "0.30"},
            }
        },
        "audit": {"log": True},
    }


@pytest.fixture
async def budgeted(make_proxy: Any, redis_server: RedisServer) -> AsyncIterator[Any]:
    """callgate with budget_policy on a started Redis store: (proxy, a raw Redis client, the
    audit records as they come)."""
    store = RedisStore(redis_server.url)
    proxy = await make_proxy(budget_policy(redis_server.url), store=store)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.start()
        yield proxy, raw, records(proxy)
    finally:
        await raw.aclose()


def call_ids(final: dict[str, Any]) -> list[str]:
    return [o["call_id"] for o in final["output"] if o["type"] == "function_call"]


async def test_eight_streamed_calls_cost_one_round_trip_each_all_or_nothing(
    upstream: Any, budgeted: Any
):
    proxy, raw, recs = budgeted
    calls = [fc("search", {"q": i}, f"c{i}") for i in range(8)]
    upstream.push(unannounced(*calls))
    before = await evalsha_calls(raw)
    final = await stream(proxy)
    assert await evalsha_calls(raw) == before + 1  # 8 calls, one script run
    assert call_ids(final) == [f"c{i}" for i in range(5)]
    assert len(recs) == 8  # on record before delivery
    blocked = {r["call_id"]: r["gate"] for r in recs if r["decision"] == "blocked"}
    assert blocked == {f"c{i}": "budget" for i in (5, 6, 7)}
    [log_key] = await raw.keys("callgate:rl:*")
    assert await raw.zcard(log_key) == 5  # the refused calls took no slot
    assert int(await raw.get("callgate:sum:budget:b@*")) == 1_500_000


async def test_a_stalled_batch_applies_each_calls_on_store_error(
    make_proxy: Any, upstream: Any, redis_server: RedisServer
):
    """Redis stops dead while the 8 calls are decided: their one round trip times out once, and
    each call applies its own tool's on_store_error."""
    cfg = {
        "on_block": "strip",
        "store": {"backend": "redis", "url": redis_server.url, "timeout": 0.3},
        "tools": {
            name: {
                "rate_limit": {"max_calls": 100, "window": 60, "on_store_error": name},
            }
            for name in ("fail_open", "fail_closed")
        },
        "audit": {"log": True},
    }
    store = RedisStore(redis_server.url, timeout=0.3)
    proxy = await make_proxy(cfg, store=store)
    names = ["fail_open", "fail_closed"] * 4
    calls = [fc(name, {}, f"c{i}") for i, name in enumerate(names)]
    assert redis_server.proc is not None
    recs = records(proxy)
    await store.start()
    upstream.push(unannounced(*calls))
    redis_server.proc.send_signal(19)  # SIGSTOP
    try:
        async with asyncio.timeout(5):
            started = asyncio.get_running_loop().time()
            final = await stream(proxy)
            elapsed = asyncio.get_running_loop().time() - started
    finally:
        redis_server.proc.send_signal(18)  # SIGCONT
    # One timeout for the whole batch (and one for the stash write of the blocked calls); one by
    # one the calls would have taken 8 (2.4 s).
    assert elapsed < 4 * 0.3 + 0.4, elapsed
    assert call_ids(final) == [f"c{i}" for i in range(0, 8, 2)]
    assert len(recs) == 8
    by_call = {r["call_id"]: r for r in recs}
    for i, name in enumerate(names):
        rec = by_call[f"c{i}"]
        if name == "fail_open":
            assert rec["decision"] == "allowed", rec
        else:
            assert (rec["decision"], rec["gate"], rec["reason"]) == (
                "blocked",
                "rate_limit",
                "store_error",
            ), rec


async def test_a_chat_stream_with_eight_calls_costs_one_round_trip(upstream: Any, budgeted: Any):
    """Chat: calls complete one after another as the stream goes (each when the next starts);
    those a read completes are decided together, so a response read at once costs one EVALSHA
    for its 8 calls, with the same all-or-nothing outcome, seen through the openai SDK."""
    proxy, raw, recs = budgeted
    ids = [f"c{i}" for i in range(8)]
    events = chat_stream(*[("search", {"q": i}) for i in range(8)], ids=ids)
    whole = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    upstream.push(SSE([whole]))  # one write: callgate reads it at once
    before = await evalsha_calls(raw)
    stream = await proxy.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    got: list[str] = []
    finish = None
    async for ch in stream:
        for tc in ch.choices[0].delta.tool_calls or []:
            if tc.id:
                got.append(tc.id)
        finish = ch.choices[0].finish_reason or finish
    assert await evalsha_calls(raw) == before + 1  # 8 calls, one script run
    assert got == ids[:5] and finish == "tool_calls"
    blocked = {r["call_id"]: r["gate"] for r in recs if r["decision"] == "blocked"}
    assert blocked == {f"c{i}": "budget" for i in (5, 6, 7)}
    [log_key] = await raw.keys("callgate:rl:*")
    assert await raw.zcard(log_key) == 5  # the refused calls took no slot


async def test_a_responses_stream_with_eight_announced_calls_costs_one_round_trip(
    upstream: Any, budgeted: Any
):
    """Responses: each call's `output_item.done` completes it; those a read completes are
    decided together, so a response read at once costs one EVALSHA for its 8 calls."""
    proxy, raw, recs = budgeted
    body = response(*[fc("search", {"q": i}, f"c{i}") for i in range(8)])
    upstream.push(SSE([b"".join(stream_events(body))], done=False))  # one write
    before = await evalsha_calls(raw)
    final = await stream(proxy)
    assert await evalsha_calls(raw) == before + 1  # 8 calls, one script run
    assert call_ids(final) == [f"c{i}" for i in range(5)]
    blocked = {r["call_id"]: r["gate"] for r in recs if r["decision"] == "blocked"}
    assert blocked == {f"c{i}": "budget" for i in (5, 6, 7)}
