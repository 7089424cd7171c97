"""The Redis store's batch round trip without a Task (proxy.store.redis_batch), on a real
redis-server: one watchdog timer keeps each batch in flight to its own deadline, a store closed
with batches in flight or waiting for a connection fails them at once, and reservation ids stay
unique (a counter behind a per-process prefix that a forked worker draws anew).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from proxy.store import SlotRequest, StoreError
from proxy.store.redis import RedisStore
from proxy.store.redis_batch import reservation_id
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_redis_burst import DelayProxy


def slot() -> list[SlotRequest]:
    return [SlotRequest(f"rl:{uuid.uuid4().hex}", 10, 60.0, 0.0)]


async def timed(store: RedisStore, after: float) -> tuple[object, float]:
    """(the reservation or its StoreError, seconds from being sent to the answer)."""
    await asyncio.sleep(after)
    started = time.monotonic()
    try:
        result: object = await store.reserve(slot())
    except StoreError as exc:
        result = exc
    return result, time.monotonic() - started


async def test_each_batch_in_flight_keeps_its_own_deadline(redis_server: RedisServer):
    """Two batches sent 0.1 s apart on two connections: the watchdog, armed for the first
    one's deadline, neither fails the second early nor lets a late one run past its own."""
    relay = DelayProxy(redis_server.port, delay=0.2)
    await relay.start()
    store = RedisStore(relay.url, timeout=0.3, pool_size=2, pool_timeout=5)
    try:
        await store.start()
        # Replies in 0.2 s, within 0.3: both answered, the second after the first's deadline.
        (first, t1), (second, t2) = await asyncio.gather(timed(store, 0), timed(store, 0.15))
        assert not isinstance(first, StoreError) and not isinstance(second, StoreError)
        assert 0.15 < t1 < 0.29 and 0.15 < t2 < 0.29, (t1, t2)
        relay.delay = 0.6
        await store.close()  # new connections: the relay's delay is read per connection
        store = RedisStore(relay.url, timeout=0.3, pool_size=2, pool_timeout=5)
        await store.start()
        (first, t1), (second, t2) = await asyncio.gather(timed(store, 0), timed(store, 0.15))
        for result, took in ((first, t1), (second, t2)):
            assert isinstance(result, StoreError) and "no answer within 0.3s" in str(result)
            assert 0.28 < took < 0.45, took  # its own deadline, not the other's
        relay.delay = 0.0
        await asyncio.sleep(0.7)  # the late replies would have come by now
        # Both cut-off connections were closed, never reused: fresh ones answer.
        assert all(o.ok for o in (await store.reserve(slot())).outcomes)
    finally:
        await store.close()
        await relay.close()


async def test_close_fails_batches_in_flight_and_waiting_at_once(redis_server: RedisServer):
    assert redis_server.proc is not None
    store = RedisStore(redis_server.url, timeout=5.0, pool_size=1, pool_timeout=5.0)
    try:
        await store.start()
        redis_server.proc.send_signal(19)  # SIGSTOP: the first batch's reply never comes
        try:
            sent = asyncio.ensure_future(store.reserve(slot()))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(store.reserve(slot()))  # no free connection
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await store.close()
            for call in (sent, waiting):
                with pytest.raises(StoreError, match="the store is closing"):
                    await asyncio.wait_for(call, 1.0)
            assert time.monotonic() - started < 0.5
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
    finally:
        await store.close()


def test_reservation_ids_are_unique_and_a_forked_worker_draws_its_own_prefix():
    ids = {reservation_id() for _ in range(100_000)}
    assert len(ids) == 100_000
    assert all(rid.isalnum() for rid in list(ids)[:100])  # no '.' or ':' (member syntax)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a worker forked after import would use
        try:
            os.write(write, reservation_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = reservation_id()
    assert child and child not in ids and child != mine
    assert child[:16] != mine[:16]  # another prefix, not just another count


def test_a_batch_payload_is_what_hiredis_packs_for_its_keys_and_args():
    """The slim client's EVALSHA is built from each call's shape encoded once (_payload);
    redis-py's path sends the same KEYS and ARGV as values (_keys_args). Held to hiredis's
    packing of those values over generated batches: keys in any script, amounts at the
    bounds, no clock and a test clock, first sends and resends."""
    import random

    import hiredis

    from proxy.store import ChargeRequest
    from proxy.store.redis import MAX_EXACT
    from proxy.store.redis_batch import RESERVE_SHA, _keys_args, _payload

    rng = random.Random(1606)
    names = ["k", "rl:search_web:alice", "budget:ümlaut:Ωmega", "x" * 300, "a b\r\nc", ""]
    store = RedisStore("redis://127.0.0.1:1/0", prefix=rng.choice(["", "cg:", "ß:"]))
    for _ in range(400):
        calls = []
        for _ in range(rng.randint(1, 6)):
            items: list[SlotRequest | ChargeRequest] = []
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(names) + str(rng.randint(0, 9))
                if rng.random() < 0.5:
                    limit = rng.choice([None, 0, 1, 10**9])
                    window, cooldown = rng.choice([0.0, 0.5, 60.0, 86400.0]), rng.random() * 5
                    items.append(SlotRequest(key, limit, window, cooldown, rng.random() < 0.8))
                else:
                    top = rng.choice([0, 1, 10**6, MAX_EXACT])
                    items.append(ChargeRequest(key, top, 3600.0, rng.randint(0, top), True))
            store._clock = rng.choice([None, lambda: 1_700_000_000.123456])
            shape, head = store._call_args(items)
            calls.append((shape, head, None))
        for resend in (False, True):
            keys, args = _keys_args(calls, resend)  # type: ignore[arg-type]
            packed = hiredis.pack_command(("EVALSHA", RESERVE_SHA, len(keys), *keys, *args))
            assert _payload(calls, resend) == packed  # type: ignore[arg-type]
