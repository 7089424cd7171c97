"""The memory store stays bounded: stashes by bytes (oldest evicted, counted), limiter state by
the keys active within their windows (swept, never evicted early: that would reset a limit)."""

from __future__ import annotations

import re
import sys
import time
import tracemalloc

import aiohttp
import pytest

from proxy import stash
from proxy.store import SlotRequest
from proxy.store.memory import STASH_ENTRY_OVERHEAD, SWEEP_EVERY, MemoryStore
from tests.conftest import FakeClock, completion

MSGS = [{"role": "user", "content": "hi"}]


def size_of(key: str, value: bytes) -> int:
    return sys.getsizeof(key) + sys.getsizeof(value) + STASH_ENTRY_OVERHEAD


def bounded(clock: FakeClock, entries: int, value_len: int = 100) -> tuple[MemoryStore, list[int]]:
    """A store whose bound holds exactly `entries` stashes of `value_len` bytes (keys "k0"...)."""
    told: list[int] = []
    bound = entries * size_of("k0", b"x" * value_len)
    return MemoryStore(clock=clock, stash_max_bytes=bound, on_evict=told.append), told


async def test_byte_accounting(clock):
    store = MemoryStore(clock=clock)
    entries = {"a": b"1", "stash:chat:bob:call_1": b"x" * 1000, "é-ключ": b"\x00" * 7}
    for key, value in entries.items():
        await store.put_stash(key, value, 60)
    assert store.stash_bytes == sum(size_of(k, v) for k, v in entries.items())
    assert store.stash_evictions == 0


async def test_oldest_evicted_first_and_counted(clock):
    store, told = bounded(clock, 3)
    for i in range(3):
        await store.put_stash(f"k{i}", b"x" * 100, 60)
        clock.advance(1)
    assert told == [] and store.stash_bytes == store.stash_max_bytes
    await store.put_stash("k3", b"x" * 100, 60)
    assert await store.get_stash_many(["k0", "k1", "k2", "k3"]) == [None] + [b"x" * 100] * 3
    assert told == [1] and store.stash_evictions == 1
    # One large stash evicts as many of the oldest as it needs.
    await store.put_stash("big", b"x" * 250, 60)
    assert await store.get_stash_many(["k1", "k2", "k3", "big"]) == [
        None,
        None,
        b"x" * 100,
        b"x" * 250,
    ]
    assert told == [1, 2] and store.stash_bytes <= store.stash_max_bytes


async def test_reput_is_accounted_once_and_becomes_newest(clock):
    store, told = bounded(clock, 3)
    for key in ("k0", "k1", "k2"):
        await store.put_stash(key, b"x" * 100, 60)
    before = store.stash_bytes
    await store.put_stash("k0", b"y" * 100, 60)  # same size: same total
    assert store.stash_bytes == before and told == []
    await store.put_stash("k0", b"y" * 10, 60)  # smaller: the total follows the new value
    assert store.stash_bytes == before - 90
    await store.put_stash("k0", b"y" * 100, 60)
    await store.put_stash("k3", b"x" * 100, 60)  # k1 is now the oldest, not k0
    assert await store.get_stash_many(["k0", "k1", "k2", "k3"]) == [
        b"y" * 100,
        None,
        b"x" * 100,
        b"x" * 100,
    ]
    assert told == [1] and len(store._stash) == 3


async def test_expired_stashes_are_freed_not_counted_as_evictions(clock):
    store, told = bounded(clock, 3)
    await store.put_stash("k0", b"x" * 100, 10)
    await store.put_stash("k1", b"x" * 100, 10)
    await store.put_stash("k2", b"x" * 100, 60)
    clock.advance(10)
    # Read: an expired stash is gone and its bytes with it.
    assert await store.get_stash_many(["k0"]) == [None]
    assert store.stash_bytes == 2 * size_of("k0", b"x" * 100)
    # Write: the expired ones at the front go first; a live one is not evicted to make room.
    await store.put_stash("k3", b"x" * 100, 60)
    await store.put_stash("k4", b"x" * 100, 60)
    assert await store.get_stash_many(["k1", "k2", "k3", "k4"]) == [None] + [b"x" * 100] * 3
    assert told == [] and store.stash_evictions == 0


async def test_a_stash_larger_than_the_bound_is_not_kept(clock):
    store, told = bounded(clock, 3)
    await store.put_stash("k0", b"x" * 100, 60)
    await store.put_stash("huge", b"old", 60)
    await store.put_stash("huge", b"x" * 10_000, 60)
    # Nothing else was evicted for it, and the key's old value is gone with it.
    assert await store.get_stash_many(["k0", "huge"]) == [b"x" * 100, None]
    assert told == [1] and store.stash_bytes == size_of("k0", b"x" * 100)


async def test_limiter_state_is_swept_but_never_evicted_early(clock):
    store = MemoryStore(clock=clock)
    limited = SlotRequest("rl:tools:t@victim", 1, 600.0, 0.0)
    assert (await store.reserve([limited])).outcomes[0].ok
    # A flood of other principals, each with a 1-second window: their keys go stale and are
    # swept, the victim's (inside its window) stays and still blocks.
    for i in range(3 * SWEEP_EVERY):
        await store.reserve([SlotRequest(f"rl:tools:t@p{i}", 5, 1.0, 0.0)])
        clock.advance(0.01)
    assert len(store._logs) < SWEEP_EVERY + 200
    assert not (await store.reserve([limited])).outcomes[0].ok
    clock.advance(600)
    assert (await store.reserve([limited])).outcomes[0].ok


async def test_sweeps_stay_amortized_with_many_active_keys(clock):
    store = MemoryStore(clock=clock)
    active = 2 * SWEEP_EVERY  # all inside a one-hour window: none may be dropped
    for i in range(active):
        await store.reserve([SlotRequest(f"rl:tools:t@p{i}", 5, 3600.0, 0.0)])
    assert len(store._logs) == active
    # The sweep after SWEEP_EVERY reservations found them all live; the next waits for as many
    # reservations as there are keys, so a sweep costs O(1) per reservation.
    assert store._until_sweep > SWEEP_EVERY


async def test_soak_stash_memory_stays_flat():
    """20k independent stashes through proxy.stash (real orjson entries, one TTL of a day):
    the byte counter never passes the bound and traced memory stops growing once it is full."""
    clock = FakeClock()
    bound = 1024 * 1024
    store = MemoryStore(clock=clock, stash_max_bytes=bound)
    entry = {
        "calls": [{"id": "call_bad", "type": "function", "function": {"name": "bad"}}],
        "results": [{"role": "tool", "tool_call_id": "call_bad", "content": "x" * 400}],
    }
    checkpoints: list[int] = []
    started = time.monotonic()
    tracemalloc.start()
    try:
        for i in range(20_000):
            keys = [stash.chat_key(f"user-{i % 97}", f"call_{i}_{j}") for j in range(2)]
            await stash.put(store, keys, {**entry, "n": i}, 86400)
            if i % 3 == 0:  # some conversations come back
                assert (await stash.get_many(store, keys[:1]))[0]["n"] == i
            clock.advance(0.01)
            assert store.stash_bytes <= bound
            if i % 2000 == 1999:
                checkpoints.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 60
    assert store.stash_evictions > 30_000  # the bound holds ~1.3k of the 40k writes
    # Flat: once full (well before the 3rd checkpoint) memory varies by a fraction of the bound.
    steady = checkpoints[2:]
    assert max(steady) - min(steady) < bound // 10, checkpoints
    # And the counter is honest: what the stashes really hold is close to what it counts.
    assert max(steady) < bound * 1.1, checkpoints


async def test_soak_through_the_app_evicts_and_counts(make_proxy, upstream):
    """Partial blocks through a real callgate: stashes stay under server.stash_max_bytes, every
    eviction is on /metrics, and an evicted stash's next turn goes upstream as the client sent
    it (the model no longer sees the blocked call; the conversation is still valid)."""
    bound = 16 * 1024
    proxy = await make_proxy(
        {"server": {"stash_max_bytes": bound}, "tools": {"bad": {"allow": False}}}
    )
    store = proxy.state.store
    assert isinstance(store, MemoryStore) and store.stash_max_bytes == bound
    requests = 300
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        for i in range(requests):
            upstream.push(
                completion(("ok", {}), ("bad", {"pad": "x" * 600}), ids=[f"ok_{i}", f"bad_{i}"])
            )
            async with http.post(
                proxy.url + "/chat/completions", json={"model": "m", "messages": MSGS}
            ) as resp:
                body = await resp.json()
            assert [c["id"] for c in body["choices"][0]["message"]["tool_calls"]] == [f"ok_{i}"]
            assert store.stash_bytes <= bound
            assert time.monotonic() < deadline
        async with http.get(proxy.root + "/metrics") as resp:
            exposition = await resp.text()
        evictions = store.stash_evictions
        assert evictions >= requests - bound // 800
        assert re.search(rf"^callgate_stash_evictions_total {evictions}\.0$", exposition, re.M)

        def turn(i: int) -> list[dict]:
            call = {
                "id": f"ok_{i}",
                "type": "function",
                "function": {"name": "ok", "arguments": "{}"},
            }
            return [
                *MSGS,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"ok_{i}", "content": "42"},
            ]

        for i, reinserted in ((0, False), (requests - 1, True)):
            upstream.push(completion(content="done"))
            async with http.post(
                proxy.url + "/chat/completions", json={"model": "m", "messages": turn(i)}
            ) as resp:
                assert resp.status == 200
            sent = upstream.bodies()[-1]["messages"]
            assert (f"bad_{i}" in str(sent)) is reinserted
            if not reinserted:
                assert sent == turn(i)


@pytest.mark.parametrize("value", [1023, "64MiB"])
def test_stash_max_bytes_is_validated(value):
    from proxy.config import ConfigError
    from proxy.policy import load_policy_text

    with pytest.raises(ConfigError, match="stash_max_bytes"):
        load_policy_text(f"server: {{stash_max_bytes: {value}}}\n", "<test>")
