"""The Redis store's hot path, probed for a limit or budget exceeded, or a call recorded twice or
never: the replay check skipped on first sends (only a resend may follow a run whose reply was
lost), and the shapes kept per items (a reload, an overlay or new content must never be
answered with an old shape). Real redis-server throughout.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
import yaml

from proxy.app import create_app
from proxy.gates import decide
from proxy.policy import load_policy, load_policy_text
from proxy.reload import reload_policy
from proxy.state import STATE
from proxy.store import ChargeRequest, Reservation, SlotRequest, StoreError
from proxy.store.redis import RedisStore
from proxy.toolcalls import CallContext, ToolCall
from tests.conftest import completion
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_redis_burst import DelayProxy
from tests.test_redis_pipelining import LoseOneReply, evalsha_calls, response_calls

MSGS = [{"role": "user", "content": "hi"}]


class LoseOneReplyAndFlush(LoseOneReply):
    """Loses the next reply (Redis ran the command) and, before the client can resend, empties
    Redis's script cache: the resend meets NOSCRIPT, loads the script, runs it again."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.flushed = 0

    async def reply_lost(self) -> None:
        raw = aioredis.Redis(port=self.target_port)
        try:
            await raw.script_flush()
            self.flushed += 1
        finally:
            await raw.aclose()


async def test_a_lost_reply_then_a_script_flush_still_records_each_call_once(
    redis_server: RedisServer,
):
    """First send (no replay look) runs and records; its reply is lost and the script cache is
    flushed: the resend meets NOSCRIPT, reloads, and must still look for the first run."""
    relay = LoseOneReplyAndFlush(redis_server.port)
    await relay.start()
    store = RedisStore(relay.url, timeout=2.0, pool_size=1, prefix="f:")
    raw = aioredis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    try:
        await store.start()
        relay.armed = True
        results = await store.reserve_many(response_calls(tag)[:4])
        assert relay.lost == 1 and relay.flushed == 1
        assert all(isinstance(r, Reservation) and all(o.ok for o in r.outcomes) for r in results)
        assert await raw.zcard(f"f:rl:{tag}") == 4
        assert int(await raw.get(f"f:sum:budget:{tag}")) == 1_200_000
    finally:
        await raw.aclose()
        await store.close()
        await relay.close()


async def test_through_redis_py_a_lost_reply_is_retried_and_recorded_once(
    redis_server: RedisServer,
):
    """A URL only redis-py reads: redis-py resends on a fresh connection by itself, so every
    send of that path carries the replay look."""
    relay = LoseOneReply(redis_server.port)
    await relay.start()
    store = RedisStore(relay.url + "?health_check_interval=0", timeout=2.0, pool_size=2)
    assert store._wire is None  # redis-py's path
    raw = aioredis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    try:
        await store.start()
        before = await evalsha_calls(raw)
        relay.armed = True
        results = await store.reserve_many(response_calls(tag)[:3])
        assert relay.lost == 1
        assert await evalsha_calls(raw) == before + 2  # ran, reply lost, ran again
        assert all(isinstance(r, Reservation) and r.token for r in results)
        assert await raw.zcard(f"callgate:rl:{tag}") == 3
        assert int(await raw.get(f"callgate:sum:budget:{tag}")) == 900_000
    finally:
        await raw.aclose()
        await store.close()
        await relay.close()


async def test_every_pooled_connection_killed_the_next_batch_is_recorded_once(
    redis_server: RedisServer,
):
    """CLIENT KILL of the store's connections (what a Redis failover or a proxy reset does):
    the first send fails on the dead connection before Redis saw it, the resend runs once."""
    store = RedisStore(redis_server.url, timeout=2.0, pool_size=3, prefix="k:")
    raw = aioredis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    try:
        await store.start()
        await raw.client_setname("killer")
        for client in await raw.client_list():
            if client["name"] != "killer":
                await raw.client_kill_filter(_id=client["id"])
        await asyncio.sleep(0.05)  # the kills reach the store's connections
        results = await asyncio.gather(*(store.reserve(c) for c in response_calls(tag)[:6]))
        assert [r.outcomes[0].ok for r in results] == [True] * 5 + [False]
        assert await raw.zcard(f"k:rl:{tag}") == 5
    finally:
        await raw.aclose()
        await store.close()


async def test_a_reply_past_the_timeout_fails_the_call_and_is_never_resent(
    redis_server: RedisServer,
):
    """The watchdog gives up on a slow reply: the caller gets a StoreError (its gate applies
    on_store_error), and nothing sends that reservation again, so it is recorded once at most."""
    relay = DelayProxy(redis_server.port, 0.3)
    await relay.start()
    store = RedisStore(relay.url, timeout=0.1, pool_size=1, pool_timeout=5.0, prefix="w:")
    raw = aioredis.Redis.from_url(redis_server.url)
    key = f"rl:{uuid.uuid4().hex}"
    try:
        await store.start()
        before = await evalsha_calls(raw)
        with pytest.raises(StoreError, match="no answer"):
            await store.reserve([SlotRequest(key, 10, 60.0, 0.0)])
        await asyncio.sleep(0.5)  # the late reply arrives and is dropped
        assert await evalsha_calls(raw) == before + 1
        assert await raw.zcard(f"w:{key}") == 1
    finally:
        await raw.aclose()
        await store.close()
        await relay.close()


def write_policy(path: Path, upstream: str, redis_url: str, prefix: str, tools: Any) -> None:
    data = {
        "upstream": {"base_url": upstream},
        "store": {"backend": "redis", "url": redis_url, "key_prefix": prefix},
        "audit": {"log": False},
        "on_block": "error",
        "budgets": {"ledger": {"max_spend": "1.00", "window": 3600}},
        "tools": tools,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    tmp.replace(path)


async def call_tool(url: str, upstream: Any, tool: str) -> bool:
    """True when the tool call came through, False when callgate blocked it."""
    upstream.push(completion((tool, {})))
    async with openai.AsyncOpenAI(base_url=url, api_key="sk-x", max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=MSGS)
        except openai.PermissionDeniedError:
            return False
    return True


async def test_a_reload_that_changes_a_limit_or_a_price_applies_on_the_next_call(
    tmp_path: Path, aiohttp_server: Any, upstream: Any, redis_server: RedisServer
):
    """The store keeps a call's shape (keys, limits, cost) per items; a reload builds new
    items, so the next call is held to the new limit and charged the new price, against the
    counts recorded before the reload."""
    path = tmp_path / "callgate.yaml"
    prefix = f"rl{uuid.uuid4().hex[:6]}:"
    limited = {"rate_limit": {"max_calls": 3, "window": 3600}}
    priced = {"budget": {"ledger": "ledger", "cost": "0.30"}}
    write_policy(path, upstream.url, redis_server.url, prefix, {"t": limited, "b": priced})
    app = create_app(load_policy(str(path)), config_path=str(path))
    server = await aiohttp_server(app, host="127.0.0.1")
    state = app[STATE]
    url = str(server.make_url("/v1"))
    assert await call_tool(url, upstream, "t")
    assert await call_tool(url, upstream, "b")  # 0.30 of 1.00

    lowered = {"rate_limit": {"max_calls": 1, "window": 3600}}
    dearer = {"budget": {"ledger": "ledger", "cost": "0.80"}}
    write_policy(path, upstream.url, redis_server.url, prefix, {"t": lowered, "b": dearer})
    assert await reload_policy(state, "test")
    assert not await call_tool(url, upstream, "t")  # 1 recorded >= the new max_calls 1
    assert not await call_tool(url, upstream, "b")  # 0.30 + 0.80 > 1.00

    raised = {"rate_limit": {"max_calls": 2, "window": 3600}}
    cheaper = {"budget": {"ledger": "ledger", "cost": "0.70"}}
    write_policy(path, upstream.url, redis_server.url, prefix, {"t": raised, "b": cheaper})
    assert await reload_policy(state, "test")
    assert await call_tool(url, upstream, "t")  # the second of 2
    assert not await call_tool(url, upstream, "t")
    assert await call_tool(url, upstream, "b")  # 0.30 + 0.70 = 1.00
    assert not await call_tool(url, upstream, "b")

    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        totals = [key async for key in raw.scan_iter(f"{prefix}sum:budget:ledger@*")]
        assert len(totals) == 1 and int(await raw.get(totals[0])) == 1_000_000
    finally:
        await raw.aclose()


OVERLAY_POLICY = """
groups:
  small:
    tools:
      t: {rate_limit: {max_calls: 1, window: 3600}}
tools:
  t: {rate_limit: {max_calls: 3, window: 3600}}
  priced:
    budget: {ledger: ledger, cost: "0.25 * double(args.n)"}
budgets:
  ledger: {max_spend: "1.00", window: 3600}
"""


async def test_one_principal_in_two_groups_gets_each_overlay_s_limit(redis_server: RedisServer):
    """Same principal, same tool, same store key; the identity's groups pick another overlay
    (another limit): each call is held to its own overlay's limit, never to a shape kept
    for the other's items."""
    policy = load_policy_text(OVERLAY_POLICY)
    store = RedisStore(redis_server.url, prefix=f"o{uuid.uuid4().hex[:6]}:")
    plain = CallContext("alice", "r", "test")
    small = CallContext("alice", "r", "test", groups=("small",))

    async def allowed(ctx: CallContext, tool: str = "t", args: str = "{}") -> bool:
        decision = await decide(ToolCall(f"c{uuid.uuid4().hex}", tool, args), policy, store, ctx)
        return decision.allowed

    try:
        await store.start()
        assert await allowed(plain)
        assert not await allowed(small)  # 1 recorded >= 1
        assert await allowed(plain)
        assert await allowed(plain)
        assert not await allowed(plain)  # 3 of 3
        # A cost expression: items built per call, each priced by its own arguments.
        assert await allowed(plain, "priced", '{"n": 3}')  # 0.75
        assert not await allowed(plain, "priced", '{"n": 2}')  # 0.75 + 0.50 > 1.00
        assert await allowed(plain, "priced", '{"n": 1}')  # 1.00
        # Items built per call come as a list: never kept, so they push no shape out.
        assert all(type(kept) is tuple for kept, _ in store._shapes.values())
        assert len(store._shapes) == 2  # t for alice in the policy and in her overlay
    finally:
        await store.close()


async def test_items_whose_content_changed_are_not_answered_with_their_old_shape(
    redis_server: RedisServer,
):
    """The Store interface takes any sequence of items: a list reused with other content
    (another key, another limit) must be reserved as it is now, as MemoryStore does."""
    store = RedisStore(redis_server.url, prefix=f"m{uuid.uuid4().hex[:6]}:")
    raw = aioredis.Redis.from_url(redis_server.url)
    items: list[SlotRequest | ChargeRequest] = [SlotRequest("rl:a", 1, 60.0, 0.0)]
    try:
        await store.start()
        assert (await store.reserve(items)).outcomes[0].ok
        items[0] = SlotRequest("rl:b", 1, 60.0, 0.0)  # same list, another key
        assert (await store.reserve(items)).outcomes[0].ok
        items.append(ChargeRequest("budget:x", 1_000_000, 60.0, 400_000))
        again = await store.reserve(items)
        assert len(again.outcomes) == 2 and not again.outcomes[0].ok  # rl:b is full
        assert await raw.zcard(f"{store._prefix}rl:a") == 1
        assert await raw.zcard(f"{store._prefix}rl:b") == 1
    finally:
        await raw.aclose()
        await store.close()


async def test_odd_keys_reach_redis_as_they_are(redis_server: RedisServer):
    """Keys with CR/LF, non-ASCII, spaces, an empty key part: each its own ledger in Redis,
    byte for byte (the shapes' RESP is length-prefixed, never split on a line break)."""
    store = RedisStore(redis_server.url, prefix="")
    raw = aioredis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:6]
    keys = [f"{tag}a\r\nb", f"{tag}ümlaut Ωmega", f"{tag}", f"{tag}$3\r\nSET"]
    try:
        await store.start()
        for _ in range(2):
            results = await store.reserve_many([[SlotRequest(k, 1, 60.0, 0.0)] for k in keys])
            assert all(isinstance(r, Reservation) for r in results)
        assert [r.outcomes[0].ok for r in results] == [False] * 4  # type: ignore[union-attr]
        for key in keys:
            assert await raw.zcard(key.encode()) == 1
        assert await raw.dbsize() >= 4 and not await raw.exists("SET")
    finally:
        await raw.aclose()
        await store.close()


def test_shapes_are_kept_per_tuple_and_bounded_when_items_are_fresh_per_call(monkeypatch):
    """The gates' items (a tuple per tool and principal) keep their shape; items built per call
    (a cost expression) fill the cache up to MAX_SHAPES, never past it."""
    from proxy.store import redis as redis_store

    monkeypatch.setattr(redis_store, "MAX_SHAPES", 50)
    store = RedisStore("redis://127.0.0.1:1/0")
    kept = (SlotRequest("rl:t@alice", 3, 60.0, 0.0),)
    shape, (_, rid) = store._call_args(kept)
    again, (_, other) = store._call_args(kept)
    assert again is shape and other != rid  # the same shape, a fresh reservation id
    for cost in range(500):
        store._call_args((ChargeRequest("budget:l@alice", 10**6, 60.0, cost),))
        assert len(store._shapes) <= 50
    listed = [SlotRequest("rl:t@bob", 3, 60.0, 0.0)]
    assert store._call_args(listed)[0] is not store._call_args(listed)[0]  # a list: never kept
