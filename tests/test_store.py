"""The store's gate semantics, one suite run against both backends (memory and a real Redis).

Time-dependent tests drive a fake wall clock: MemoryStore takes it directly, and RedisStore
passes it to its Lua script in place of the server's TIME. A separate group runs on real time
(short windows) to cover the server-clock path.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from proxy.gates.budget import block_for as budget_block
from proxy.policy import to_micros
from proxy.store import ChargeRequest, Reservation, SlotRequest, Store, StoreError, redis_batch
from proxy.store import memory as memory_store
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.redis_batch import RESERVE_SHA, _keys_args
from tests.conftest import FakeClock
from tests.redis_server import RedisServer, redis_server_fixture, start_redis  # noqa: F401


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.cleanup()


@dataclass
class Env:
    backend: str
    store: Store
    clock: FakeClock
    prefix: str = ""
    url: str = ""

    async def raw(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url)


def new_store(backend: str, clock: FakeClock | None, server: RedisServer | None) -> Env:
    fake = clock or FakeClock()
    if backend == "memory":
        return Env(backend, MemoryStore(clock=clock), fake)
    assert server is not None
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(server.url, timeout=2.0, prefix=prefix, clock=clock)
    return Env(backend, store, fake, prefix, server.url)


@pytest.fixture(params=["memory", "redis"])
async def env(request, clock) -> AsyncIterator[Env]:
    server = request.getfixturevalue("shared_redis") if request.param == "redis" else None
    e = new_store(request.param, clock, server)
    yield e
    await e.store.close()


@pytest.fixture(params=["memory", "redis"])
async def real_env(request) -> AsyncIterator[Env]:
    """A store on real time: the wall clock for memory, the server's TIME for Redis."""
    server = request.getfixturevalue("shared_redis") if request.param == "redis" else None
    e = new_store(request.param, None, server)
    yield e
    await e.store.close()


def slot(key="rl:k", max_calls=2, window=10.0, cooldown=0.0, enforce=True) -> SlotRequest:
    return SlotRequest(key, max_calls, window, cooldown, enforce)


def charge(key="budget:b", max_spend="1.00", cost="0.03", window=3600.0, enforce=True):
    return ChargeRequest(
        key, to_micros(Decimal(max_spend)), window, to_micros(Decimal(cost)), enforce
    )


async def one(store: Store, item) -> Reservation:  # type: ignore[no-untyped-def]
    return await store.reserve([item])


def approx(x: float):  # type: ignore[no-untyped-def]
    return pytest.approx(x, abs=1e-6)


# --- rate limit -----------------------------------------------------------------------------


async def test_sliding_window_exact_at_boundary(env: Env):
    store, clock = env.store, env.clock
    r = await one(store, slot())
    assert r.outcomes[0].ok and r.outcomes[0].count == 0 and len(r.token) == 1
    clock.advance(1)
    assert (await one(store, slot())).outcomes[0].count == 1
    clock.advance(1)
    blocked = (await one(store, slot())).outcomes[0]
    assert not blocked.ok and blocked.limit == "max_calls" and blocked.count == 2
    assert blocked.retry_after == approx(8.0)  # the call at t0 frees at t0 + 10
    clock.advance(7.75)  # t0 + 9.75: still inside the window
    blocked = (await one(store, slot())).outcomes[0]
    assert not blocked.ok and blocked.retry_after == approx(0.25)
    clock.advance(0.25)  # t0 + 10: the call at t0 no longer counts, exactly now
    freed = (await one(store, slot())).outcomes[0]
    assert freed.ok and freed.count == 1
    # Now t0+1 and t0+10 are in the window: the next frees when t0+1 leaves it.
    blocked = (await one(store, slot())).outcomes[0]
    assert not blocked.ok and blocked.count == 2 and blocked.retry_after == approx(1.0)


async def test_blocked_calls_do_not_count(env: Env):
    for _ in range(2):
        assert (await one(env.store, slot())).outcomes[0].ok
    for _ in range(5):
        assert not (await one(env.store, slot())).outcomes[0].ok
    env.clock.advance(10)
    assert (await one(env.store, slot())).outcomes[0].count == 0


async def test_keys_are_independent(env: Env):
    assert (await one(env.store, slot("rl:a", max_calls=1))).outcomes[0].ok
    assert not (await one(env.store, slot("rl:a", max_calls=1))).outcomes[0].ok
    assert (await one(env.store, slot("rl:b", max_calls=1))).outcomes[0].ok


async def test_max_calls_zero_never_frees(env: Env):
    out = (await one(env.store, slot(max_calls=0))).outcomes[0]
    assert not out.ok and out.limit == "max_calls" and out.retry_after is None


async def test_cooldown(env: Env):
    store, clock = env.store, env.clock
    item = slot(max_calls=None, window=60, cooldown=2.0)
    assert (await one(store, item)).outcomes[0].ok
    clock.advance(0.5)
    out = (await one(store, item)).outcomes[0]
    assert not out.ok and out.limit == "cooldown"
    assert out.elapsed == approx(0.5) and out.retry_after == approx(1.5)
    clock.advance(1.5)  # elapsed == cooldown: allowed
    out = (await one(store, item)).outcomes[0]
    assert out.ok and out.elapsed == 0.0 and out.retry_after is None


async def test_cooldown_longer_than_window(env: Env):
    store, clock = env.store, env.clock
    item = slot(max_calls=5, window=1.0, cooldown=3.0)
    assert (await one(store, item)).outcomes[0].ok
    clock.advance(1.5)  # out of the window, still in the cooldown
    out = (await one(store, item)).outcomes[0]
    assert not out.ok and out.limit == "cooldown" and out.count == 0
    assert out.retry_after == approx(1.5)
    clock.advance(1.5)
    assert (await one(store, item)).outcomes[0].ok


async def test_cooldown_checked_before_max_calls(env: Env):
    item = slot(max_calls=1, window=10, cooldown=2.0)
    assert (await one(env.store, item)).outcomes[0].ok
    env.clock.advance(1)
    out = (await one(env.store, item)).outcomes[0]
    assert out.limit == "cooldown" and out.count == 1 and out.retry_after == approx(1.0)
    env.clock.advance(1)
    out = (await one(env.store, item)).outcomes[0]
    assert out.limit == "max_calls" and out.retry_after == approx(8.0)


# --- budget ---------------------------------------------------------------------------------


async def test_budget_exactly_at_limit(env: Env):
    item = charge(max_spend="1.00", cost="0.25")
    for i in range(4):
        out = (await one(env.store, item)).outcomes[0]
        assert out.ok and out.spent_micros == i * 250_000
    out = (await one(env.store, item)).outcomes[0]
    assert not out.ok and out.limit == "max_spend" and out.spent_micros == 1_000_000


async def test_budget_decimals_exact_33_of_cost_003(env: Env):
    item = charge(max_spend="1.00", cost="0.03")
    results = [(await one(env.store, item)).outcomes[0] for _ in range(40)]
    assert sum(o.ok for o in results) == 33
    assert all(o.ok for o in results[:33])
    last = results[33]
    assert last.spent_micros == 990_000
    assert budget_block(last, item).message == "Budget exceeded: 0.99 + 0.03 > 1.00"


async def test_budget_point_one_plus_point_two(env: Env):
    store = env.store
    assert (await one(store, charge(max_spend="0.30", cost="0.1"))).outcomes[0].ok
    assert (await one(store, charge(max_spend="0.30", cost="0.2"))).outcomes[0].ok
    # 0.1 + 0.2 is exactly 0.30: nothing is left, not even a micro-unit.
    assert (await one(store, charge(max_spend="0.30", cost="0"))).outcomes[0].ok
    out = (await one(store, charge(max_spend="0.30", cost="0.000001"))).outcomes[0]
    assert not out.ok and out.spent_micros == 300_000


async def test_budget_retry_after(env: Env):
    store, clock = env.store, env.clock
    for _ in range(2):
        assert (await one(store, charge(max_spend="1.00", cost="0.40", window=10))).outcomes[0].ok
        clock.advance(1)
    # t0 + 2: spent 0.80.
    out = (await one(store, charge(max_spend="1.00", cost="0.40", window=10))).outcomes[0]
    assert not out.ok and out.retry_after == approx(8.0)  # once the t0 charge ages out
    out = (await one(store, charge(max_spend="1.00", cost="0.70", window=10))).outcomes[0]
    assert not out.ok and out.retry_after == approx(9.0)  # needs both to age out
    out = (await one(store, charge(max_spend="1.00", cost="1.01", window=10))).outcomes[0]
    assert not out.ok and out.retry_after is None  # never fits
    clock.advance(8)  # t0 + 10: the first charge is gone
    out = (await one(store, charge(max_spend="1.00", cost="0.60", window=10))).outcomes[0]
    assert out.ok and out.spent_micros == 400_000


async def test_budget_window_slides(env: Env):
    item = charge(max_spend="0.10", cost="0.10", window=5)
    assert (await one(env.store, item)).outcomes[0].ok
    env.clock.advance(4.75)
    assert not (await one(env.store, item)).outcomes[0].ok
    env.clock.advance(0.25)
    out = (await one(env.store, item)).outcomes[0]
    assert out.ok and out.spent_micros == 0


# --- reservations: all or nothing, shadow, release ------------------------------------------


async def test_budget_block_does_not_consume_slot(env: Env):
    store = env.store
    items = [slot(max_calls=1), charge(max_spend="0.02", cost="0.03")]
    r = await store.reserve(items)
    assert r.outcomes[0].ok and not r.outcomes[1].ok and r.token == []
    # The slot is still free, the ledger still empty.
    r = await store.reserve([slot(max_calls=1), charge(max_spend="0.02", cost="0.02")])
    assert r.outcomes[0].ok and r.outcomes[0].count == 0
    assert r.outcomes[1].ok and r.outcomes[1].spent_micros == 0 and len(r.token) == 2


async def test_rate_block_does_not_charge(env: Env):
    store = env.store
    assert (await store.reserve([slot(max_calls=1)])).outcomes[0].ok
    r = await store.reserve([slot(max_calls=1), charge(cost="0.50")])
    assert not r.outcomes[0].ok and r.outcomes[1].ok and r.token == []
    assert (await one(store, charge(cost="0"))).outcomes[0].spent_micros == 0


async def test_shadow_items(env: Env):
    store = env.store
    shadow_slot = slot("rl:shadow", max_calls=1, enforce=False)
    shadow_charge = charge("budget:shadow", max_spend="0.05", cost="0.03", enforce=False)
    r = await store.reserve([slot(max_calls=5), shadow_slot, shadow_charge])
    assert all(o.ok for o in r.outcomes) and len(r.token) == 3
    r = await store.reserve([slot(max_calls=5), shadow_slot, shadow_charge])
    assert [o.ok for o in r.outcomes] == [True, False, False]
    # Shadow failures never block: the enforced slot was recorded, the shadow items were not.
    assert [k for k, _ in r.token] == ["rl:k"]
    r = await store.reserve([slot(max_calls=5), shadow_slot, shadow_charge])
    assert r.outcomes[0].count == 2
    assert r.outcomes[1].count == 1  # only the call it would have let through counts
    assert r.outcomes[2].spent_micros == 30_000


async def test_enforced_failure_records_passing_shadow_items_neither(env: Env):
    store = env.store
    r = await store.reserve([slot(max_calls=0), slot("rl:shadow", max_calls=5, enforce=False)])
    assert [o.ok for o in r.outcomes] == [False, True] and r.token == []
    r = await store.reserve([slot("rl:shadow", max_calls=5, enforce=False)])
    assert r.outcomes[0].count == 0


async def test_release_rolls_back_slot_and_charge(env: Env):
    store = env.store
    items = [slot(max_calls=1), charge(max_spend="0.05", cost="0.03")]
    r = await store.reserve(items)
    assert len(r.token) == 2
    await store.release(r.token)
    r = await store.reserve(items)
    assert r.outcomes[0].count == 0 and r.outcomes[1].spent_micros == 0 and len(r.token) == 2
    await store.release([])  # nothing to do
    await store.release(r.token)
    await store.release(r.token)  # twice is harmless
    r = await store.reserve(items)
    assert r.outcomes[1].spent_micros == 0


async def test_release_one_of_several_charges(env: Env):
    store = env.store
    tokens = [(await one(store, charge(cost=c))).token for c in ("0.01", "0.02", "0.04")]
    await store.release(tokens[1])
    assert (await one(store, charge(cost="0"))).outcomes[0].spent_micros == 50_000


async def test_release_after_expiry_is_harmless(env: Env):
    store = env.store
    r = await one(store, charge(cost="0.30", window=5))
    env.clock.advance(5)
    assert (await one(store, charge(cost="0.10", window=5))).outcomes[0].spent_micros == 0
    await store.release(r.token)  # already aged out: the ledger must not go negative
    assert (await one(store, charge(cost="0", window=5))).outcomes[0].spent_micros == 100_000


async def test_release_restores_the_previous_cooldown(env: Env):
    """A released call never happened: the cooldown runs from the newest call left."""
    store, clock = env.store, env.clock
    first = await one(store, slot(max_calls=None, window=60))
    clock.advance(4)
    newest = await one(store, slot(max_calls=None, window=60))
    await store.release(newest.token)
    clock.advance(2)  # 6 s after the first call, 2 s after the released one
    assert (await one(store, slot(max_calls=None, window=60, cooldown=5))).outcomes[0].ok
    await store.release(first.token)


async def test_release_when_the_clock_went_back(env: Env):
    """Calls recorded out of time order (the wall clock stepped back): a release still leaves
    the cooldown running from the newest call left, wherever it sits in the log."""
    store, clock = env.store, env.clock
    for step in (0, 10, -20):  # calls at t0, t0 + 10, t0 - 10
        clock.advance(step)
        await one(store, slot(max_calls=None, window=60))
    clock.advance(5)  # t0 - 5
    last = await one(store, slot(max_calls=None, window=60))
    await store.release(last.token)
    clock.advance(17)  # t0 + 12: 2 s after the newest call left
    blocked = (await one(store, slot(max_calls=None, window=60, cooldown=5))).outcomes[0]
    assert not blocked.ok and blocked.limit == "cooldown"
    assert blocked.elapsed == approx(2.0) and blocked.retry_after == approx(3.0)


async def test_concurrent_reservations_are_atomic(env: Env):
    store = env.store
    results = await asyncio.gather(
        *(
            store.reserve([slot(max_calls=10), charge(max_spend="1.00", cost="0.03")])
            for _ in range(60)
        )
    )
    allowed = [r for r in results if r.token]
    assert len(allowed) == 10
    assert sorted(r.outcomes[0].count for r in allowed) == list(range(10))


@pytest.mark.parametrize("compact_at", [None, 3])
async def test_differential_random_sequence(clock, shared_redis, compact_at, monkeypatch):
    """Memory and Redis give the same outcome for every step of a random workload (also with
    the memory store compacting its logs all the time)."""
    if compact_at is not None:
        monkeypatch.setattr(memory_store, "COMPACT_AT", compact_at)
    memory = MemoryStore(clock=clock)
    red = new_store("redis", clock, shared_redis).store
    rng = random.Random(5)
    tokens: list[tuple[list, list]] = []
    seen: set[str] = set()
    released = 0
    try:
        for _step in range(300):
            items = []
            if rng.random() < 0.8:
                items.append(
                    slot(
                        f"rl:{rng.randint(1, 3)}",
                        max_calls=rng.choice([None, 0, 1, 3, 5]),
                        window=rng.choice([2.0, 5.0]),
                        cooldown=rng.choice([0.0, 0.0, 0.5, 3.0]),
                        enforce=rng.random() < 0.8,
                    )
                )
                if items[0].max_calls is None and not items[0].cooldown:
                    items.pop()
            if rng.random() < 0.6:
                items.append(
                    charge(
                        f"budget:{rng.randint(1, 2)}",
                        max_spend=rng.choice(["0.10", "0.25"]),
                        cost=rng.choice(["0", "0.01", "0.03", "0.07", "0.3"]),
                        window=rng.choice([3.0, 4.0]),
                        enforce=rng.random() < 0.8,
                    )
                )
            if items:
                a = await memory.reserve(items)
                b = await red.reserve(items)
                for x, y in zip(a.outcomes, b.outcomes, strict=True):
                    assert (x.ok, x.limit, x.count, x.spent_micros) == (
                        y.ok, y.limit, y.count, y.spent_micros,
                    ), (_step, items)  # fmt: skip
                    assert x.elapsed == approx(y.elapsed)
                    seen.add(x.limit)
                    assert (x.retry_after is None) == (y.retry_after is None), (_step, items)
                    if x.retry_after is not None:
                        assert x.retry_after == approx(y.retry_after)
                assert len(a.token) == len(b.token)
                if a.token:
                    tokens.append((a.token, b.token))
            if tokens and rng.random() < 0.1:
                ta, tb = tokens.pop(rng.randrange(len(tokens)))
                await memory.release(ta)
                await red.release(tb)
                released += 1
            clock.advance(rng.choice([0.0, 0.25, 0.5, 1.0]))
        assert seen == {"", "max_calls", "cooldown", "max_spend"} and released > 5
    finally:
        await red.close()


async def test_memory_log_gives_expired_entries_back(clock, monkeypatch):
    """A log keeps what is inside its window (plus at most a compaction's worth), however many
    calls went through it, and stays exact across compactions."""
    monkeypatch.setattr(memory_store, "COMPACT_AT", 16)
    store = MemoryStore(clock=clock)
    for i in range(1000):
        r = await store.reserve([slot(max_calls=100, window=10.0), charge(cost="0.001")])
        assert [o.ok for o in r.outcomes] == [True, True]
        assert r.outcomes[0].count == min(i, 39)  # four a second; one leaves as one comes
        assert r.outcomes[1].spent_micros == i * 1000  # the one-hour budget keeps them all
        clock.advance(0.25)
    log = store._logs["rl:k"]
    assert len(log) == 40
    assert len(log.times) <= 40 + 40 + 16  # live entries, and expired ones not yet compacted
    await store.release(r.token)
    assert len(log) == 39 and store._logs["budget:b"].total == 999 * 1000


# --- stash ----------------------------------------------------------------------------------


async def test_stash_put_get(env: Env):
    store = env.store
    assert await store.get_stash_many([]) == []
    await store.put_stash("stash:chat:a", b'{"x":1}', 60)
    await store.put_stash("stash:chat:b", b"\x00\xff", 60)
    got = await store.get_stash_many(["stash:chat:a", "stash:chat:missing", "stash:chat:b"])
    assert got == [b'{"x":1}', None, b"\x00\xff"]
    await store.put_stash("stash:chat:a", b"new", 60)
    assert await store.get_stash_many(["stash:chat:a"]) == [b"new"]


async def test_stash_expires(env: Env):
    store = env.store
    await store.put_stash("stash:chat:short", b"1", 0.15)
    await store.put_stash("stash:chat:long", b"2", 60)
    if env.backend == "memory":
        env.clock.advance(0.2)
    else:
        await asyncio.sleep(0.2)  # Redis expires on its own clock
    assert await store.get_stash_many(["stash:chat:short", "stash:chat:long"]) == [None, b"2"]


# --- Redis specifics ------------------------------------------------------------------------


async def test_redis_keys_expire_with_their_window(clock, shared_redis):
    env = new_store("redis", clock, shared_redis)
    raw = await env.raw()
    try:
        await env.store.reserve([slot("rl:x", max_calls=5, window=10, cooldown=30)])
        await env.store.reserve([charge("budget:y", window=20)])
        await env.store.put_stash("stash:chat:z", b"v", 5)
        p = env.prefix
        assert 29_000 < await raw.pttl(f"{p}rl:x") <= 30_001  # max(window, cooldown)
        assert 19_000 < await raw.pttl(f"{p}budget:y") <= 20_001
        assert 19_000 < await raw.pttl(f"{p}sum:budget:y") <= 20_001
        assert await raw.get(f"{p}sum:budget:y") == b"30000"
        assert 4_000 < await raw.pttl(f"{p}stash:chat:z") <= 5_000
        assert sorted(await raw.keys(f"{p}*")) == sorted(
            k.encode() for k in (f"{p}rl:x", f"{p}budget:y", f"{p}sum:budget:y", f"{p}stash:chat:z")
        )
    finally:
        await raw.aclose()
        await env.store.close()


async def test_redis_member_holds_integer_micros(clock, shared_redis):
    env = new_store("redis", clock, shared_redis)
    raw = await env.raw()
    try:
        r = await env.store.reserve([charge("budget:m", max_spend="5", cost="1.234567")])
        ((_key, member),) = r.token
        assert member.endswith(":1234567")
        members = await raw.zrange(f"{env.prefix}budget:m", 0, -1, withscores=True)
        assert members[0][0].decode() == member
        assert members[0][1] == round(clock() * 1_000_000)  # integer microseconds
    finally:
        await raw.aclose()
        await env.store.close()


async def test_redis_lost_ledger_total_is_rebuilt(clock, shared_redis):
    env = new_store("redis", clock, shared_redis)
    raw = await env.raw()
    try:
        for cost in ("0.10", "0.20", "0.04"):
            assert (await one(env.store, charge("budget:r", cost=cost))).outcomes[0].ok
        await raw.delete(f"{env.prefix}sum:budget:r")  # as if evicted
        out = (await one(env.store, charge("budget:r", cost="0.66"))).outcomes[0]
        assert out.ok and out.spent_micros == 340_000
        out = (await one(env.store, charge("budget:r", cost="0.01"))).outcomes[0]
        assert not out.ok and out.spent_micros == 1_000_000
        assert await raw.pttl(f"{env.prefix}sum:budget:r") > 3_500_000
    finally:
        await raw.aclose()
        await env.store.close()


async def test_redis_script_cache_flushed(clock, shared_redis):
    """EVALSHA answers NOSCRIPT after SCRIPT FLUSH (or a restart); the store reloads it."""
    env = new_store("redis", clock, shared_redis)
    raw = await env.raw()
    try:
        assert (await one(env.store, slot())).outcomes[0].ok
        await raw.script_flush()
        assert (await one(env.store, slot())).outcomes[0].count == 1
        await raw.script_flush()
        await env.store.release((await one(env.store, charge())).token)
    finally:
        await raw.aclose()
        await env.store.close()


async def test_real_time_window(real_env: Env):
    """No fake clock: Redis runs on its server TIME, memory on time.time()."""
    store = real_env.store
    item = slot(f"rl:{uuid.uuid4().hex}", max_calls=2, window=0.3)
    start = time.monotonic()
    assert (await one(store, item)).outcomes[0].ok
    assert (await one(store, item)).outcomes[0].ok
    out = (await one(store, item)).outcomes[0]
    assert not out.ok and out.count == 2
    assert 0 < out.retry_after <= 0.3
    await asyncio.sleep(out.retry_after + 0.02)
    out = (await one(store, item)).outcomes[0]
    assert out.ok and out.count <= 1
    assert time.monotonic() - start < 2


async def test_real_time_keys_vanish(shared_redis):
    env = new_store("redis", None, shared_redis)
    raw = await env.raw()
    try:
        await env.store.reserve(
            [slot("rl:gone", max_calls=1, window=0.1), charge("budget:gone", window=0.1)]
        )
        assert await raw.exists(f"{env.prefix}rl:gone", f"{env.prefix}sum:budget:gone") == 2
        await asyncio.sleep(0.25)
        assert await raw.keys(f"{env.prefix}*") == []
    finally:
        await raw.aclose()
        await env.store.close()


async def test_redis_down_raises_store_error_quickly_and_recovers(redis_server: RedisServer):
    store = RedisStore(redis_server.url, timeout=0.2)
    try:
        await store.start()  # as the app does: connections and scripts ready before the timing
        assert (await one(store, slot(max_calls=1))).outcomes[0].ok
        await store.put_stash("stash:chat:s", b"v", 60)
        await store.ping()
        redis_server.stop()
        for op in (
            lambda: one(store, slot(max_calls=1)),
            lambda: store.release([("rl:k", "x.1:0")]),
            lambda: store.put_stash("stash:chat:s", b"v", 60),
            lambda: store.get_stash_many(["stash:chat:s"]),
            store.ping,
        ):
            started = time.monotonic()
            with pytest.raises(StoreError, match="redis"):
                await op()
            assert time.monotonic() - started < 1.0  # the 0.2 s bound, plus a loaded machine
        redis_server.start()  # empty, with an empty script cache: NOSCRIPT, then reloaded
        await store.ping()
        assert (await one(store, slot(max_calls=1))).outcomes[0].ok
        assert await store.get_stash_many(["stash:chat:s"]) == [None]
    finally:
        await store.close()


async def test_redis_restart_while_idle_pool_recovers(redis_server: RedisServer):
    """Pooled connections die with the server; the next calls reconnect without an error."""
    store = RedisStore(redis_server.url, timeout=0.5)
    try:
        await asyncio.gather(*(one(store, slot(max_calls=100)) for _ in range(8)))
        redis_server.restart()
        results = await asyncio.gather(*(one(store, slot(max_calls=100)) for _ in range(8)))
        assert all(r.outcomes[0].ok for r in results)
    finally:
        await store.close()


async def test_redis_slow_server_times_out(redis_server: RedisServer):
    store = RedisStore(redis_server.url, timeout=0.2)
    try:
        await store.ping()
        assert redis_server.proc is not None
        redis_server.proc.send_signal(19)  # SIGSTOP: connected, but never answers
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"no answer within 0\.2s"):
                await one(store, slot())
            assert time.monotonic() - started < 0.5
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
        await store.ping()
        assert (await one(store, slot())).outcomes[0].ok
    finally:
        await store.close()


async def test_redis_retry_of_a_reservation_whose_reply_was_lost_records_once(
    shared_redis, monkeypatch
):
    """A resend (a batch whose first run's reply may have been lost) carries the same
    reservation ids and has the script look for that first run: found, it records nothing a
    second time and answers as the first run did."""
    e = new_store("redis", None, shared_redis)
    try:
        # The id source's state, not its function: compiled, the store calls that directly.
        monkeypatch.setattr(redis_batch, "_rid_prefix", "samerid")
        monkeypatch.setattr(redis_batch, "_rid_count", itertools.repeat(0))
        items = [slot(max_calls=5), charge(max_spend="1.00", cost="0.30")]
        first = await e.store.reserve(items)
        assert all(o.ok for o in first.outcomes)
        assert isinstance(e.store, RedisStore)
        shape, head = e.store._call_args(items)
        keys, args = _keys_args([(shape, head, None)], True)  # a resend: the same ids
        raw = await e.raw()
        try:
            flat, members = await raw.evalsha(RESERVE_SHA, len(keys), *keys, *args)
            assert flat[::6] == [1, 1]  # granted, as the first run
            assert [m.decode() for m in members] == [member for _, member in first.token]
            assert await raw.zcard(e.prefix + "rl:k") == 1
            assert int(await raw.get(e.prefix + "sum:" + items[1].key)) == 300_000
        finally:
            await raw.aclose()
        monkeypatch.setattr(redis_batch, "_rid_prefix", "otherrid")
        assert all(o.ok for o in (await e.store.reserve(items)).outcomes)  # a new call counts
        raw = await e.raw()
        try:
            assert await raw.zcard(e.prefix + "rl:k") == 2
        finally:
            await raw.aclose()
    finally:
        await e.store.close()


# --- awaited while an exception is being handled ----------------------------------------------


async def test_redis_store_works_when_awaited_inside_an_exception_handler(
    shared_redis: RedisServer,
):
    """Compiled by mypyc, a coroutine with an await in a `finally:` block re-raised the
    exception its caller was handling, even on success: the Redis store's warm-up did so when
    serve ran the loop inside `except ImportError` (no uvloop). No compiled module may keep such
    a block (tests/test_native.py); this is the behaviour that rule protects."""
    store = RedisStore(shared_redis.url, timeout=2.0, prefix=f"t{uuid.uuid4().hex[:8]}:")
    try:
        raise LookupError("being handled")
    except LookupError:
        await store.start()
        outcome = await one(store, slot(max_calls=1))
        second = await one(store, slot(max_calls=1))
        await store.close()
    assert outcome.outcomes[0].ok
    assert not second.outcomes[0].ok
