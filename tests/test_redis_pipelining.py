"""Auto-pipelining in the Redis store: the reservations issued in one event-loop iteration go to
Redis as one script run on one connection, each call still all-or-nothing on its own.

Counted on a real redis-server through INFO commandstats: how many EVALSHA a set of calls
cost. Failures of a batch (a stalled Redis, a reply lost on the wire) reach every caller in it:
each applies its own on_store_error, and a retried batch records nothing twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.policy import to_micros
from proxy.store import ChargeRequest, Reservation, SlotRequest, StoreError
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.conftest import FakeClock
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_redis_burst import decide_one


async def evalsha_calls(raw: aioredis.Redis) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def response_calls(tag: str) -> list[list[SlotRequest | ChargeRequest]]:
    """A response's 8 tool calls: each takes a slot of a 5-per-window limit and a 0.30 charge
    against a 2.00 budget. Calls 1-5 fit the limit; the budget stops the 7th and 8th; the
    6th is refused by the limit and so charges nothing (all-or-nothing per call)."""
    calls = []
    for _ in range(8):
        calls.append(
            [
                SlotRequest(f"rl:{tag}", 5, 60.0, 0.0),
                ChargeRequest(f"budget:{tag}", to_micros(Decimal("2.00")), 3600.0, 300_000),
            ]
        )
    return calls


def summary(result: Reservation | StoreError) -> tuple[Any, ...]:
    assert isinstance(result, Reservation), result
    return tuple((o.ok, o.limit, o.count, o.spent_micros) for o in result.outcomes)


async def test_reserve_many_is_one_round_trip_and_all_or_nothing_per_call(
    redis_server: RedisServer,
):
    clock = FakeClock()
    store = RedisStore(redis_server.url, clock=clock, prefix="p:")
    raw = aioredis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    try:
        await store.start()
        before = await evalsha_calls(raw)
        results = await store.reserve_many(response_calls(tag))
        assert await evalsha_calls(raw) == before + 1  # 8 calls, one script run
        memory = await MemoryStore(clock=clock).reserve_many(response_calls(tag))
        assert [summary(r) for r in results] == [summary(r) for r in memory]
        ok = [all(o.ok for o in r.outcomes) for r in results]  # type: ignore[union-attr]
        assert ok == [True] * 5 + [False] * 3
        # Calls 6-8 recorded nothing: neither the slot nor the charge.
        assert await raw.zcard(f"p:rl:{tag}") == 5
        assert int(await raw.get(f"p:sum:budget:{tag}")) == 1_500_000
        assert [len(r.token) for r in results] == [2] * 5 + [0] * 3  # type: ignore[union-attr]
        # A call with nothing to reserve costs nothing and still gets its place.
        mixed = await store.reserve_many([[], [SlotRequest(f"rl:x{tag}", 1, 60.0, 0.0)], []])
        assert [len(r.outcomes) for r in mixed] == [0, 1, 0]  # type: ignore[union-attr]
    finally:
        await raw.aclose()
        await store.close()


async def test_concurrent_reservations_of_one_iteration_share_a_script_run(
    redis_server: RedisServer,
):
    store = RedisStore(redis_server.url, max_batch=16)
    raw = aioredis.Redis.from_url(redis_server.url)
    item = SlotRequest(f"rl:{uuid.uuid4().hex}", 30, 60.0, 0.0)
    try:
        await store.start()
        before = await evalsha_calls(raw)
        results = await asyncio.gather(*(store.reserve([item]) for _ in range(10)))
        assert await evalsha_calls(raw) == before + 1
        assert sorted(r.outcomes[0].count for r in results) == list(range(10))
        # Past max_batch the calls take further batches: 40 calls, 16 per script run.
        results = await asyncio.gather(*(store.reserve([item]) for _ in range(40)))
        assert await evalsha_calls(raw) == before + 1 + 3
        assert sum(r.outcomes[0].ok for r in results) == 20  # exactly the limit, 30
        # reserve_many keeps a response's calls in one run: 12 single calls open a batch, and
        # the 8 calls of a response that would overflow it go together into the next one.
        other = SlotRequest(f"rl:{uuid.uuid4().hex}", 100, 60.0, 0.0)
        before = await evalsha_calls(raw)
        singles = [store.reserve([other]) for _ in range(12)]
        *ones, many = await asyncio.gather(*singles, store.reserve_many([[other]] * 8))
        # Two runs for 20 calls at 16 a run: 12 then 8 (16 then 4 would have split the response).
        assert await evalsha_calls(raw) == before + 2
        assert [r.outcomes[0].count for r in ones] == list(range(12))
        assert [r.outcomes[0].count for r in many] == list(range(12, 20))  # type: ignore[union-attr]
    finally:
        await raw.aclose()
        await store.close()


async def test_a_batch_that_times_out_applies_each_calls_on_store_error(
    redis_server: RedisServer,
):
    """Redis stopped dead: the batch's one round trip times out once, and every call in it
    applies its own on_store_error (fail_closed blocks, fail_open allows)."""
    store = RedisStore(redis_server.url, timeout=0.3, pool_size=1, pool_timeout=5)
    assert redis_server.proc is not None
    tools = ("closed", "open") * 4
    try:
        await store.start()
        redis_server.proc.send_signal(19)  # SIGSTOP
        try:
            started = time.monotonic()
            async with asyncio.timeout(5):
                results = await asyncio.gather(*(decide_one(store, tool) for tool in tools))
                many = await store.reserve_many([[SlotRequest("rl:m", 5, 60.0, 0.0)]] * 3)
            elapsed = time.monotonic() - started
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
        # One connection, eight calls: had they gone one by one, 8 timeouts (2.4 s).
        assert elapsed < 2 * 0.3 + 0.5, elapsed
        for (decision, took), tool in zip(results, tools, strict=True):
            assert 0.25 < took < 1.0, took
            if tool == "closed":
                assert decision.block is not None
                assert (decision.block.gate, decision.block.reason) == ("rate_limit", "store_error")
                assert "no answer within 0.3s" in decision.block.message
            else:
                assert decision.allowed and decision.fail_open == ["rate_limit"]
        assert len(many) == 3
        assert all(isinstance(r, StoreError) and "no answer" in str(r) for r in many)
        assert (await decide_one(store, "closed"))[0].allowed  # and recovered
    finally:
        await store.close()


class LoseOneReply:
    """A TCP relay in front of Redis that, once armed, closes the connection instead of passing
    on the next reply: Redis ran the command, the client never hears of it and retries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.lost = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)):
            task = asyncio.create_task(pump)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool
    ) -> None:
        try:
            while chunk := await src.read(65536):
                if replies and self.armed:
                    self.armed = False
                    self.lost += 1
                    await self.reply_lost()
                    break  # closes `dst`: the reply is lost
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def reply_lost(self) -> None:
        """What else happens the moment a reply is lost (a subclass's hook)."""

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def test_a_batch_whose_reply_was_lost_is_retried_and_records_each_call_once(
    redis_server: RedisServer,
):
    relay = LoseOneReply(redis_server.port)
    await relay.start()
    store = RedisStore(relay.url, timeout=2.0, pool_size=2, prefix="r:")
    raw = aioredis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    try:
        await store.start()
        before = await evalsha_calls(raw)
        relay.armed = True
        results = await store.reserve_many(response_calls(tag)[:5])
        assert relay.lost == 1
        assert await evalsha_calls(raw) == before + 2  # ran, reply lost, ran again
        assert all(isinstance(r, Reservation) and r.token for r in results)
        # The retry found every call of the batch recorded and recorded none of them again.
        assert await raw.zcard(f"r:rl:{tag}") == 5
        assert int(await raw.get(f"r:sum:budget:{tag}")) == 1_500_000
        blocked = await store.reserve(response_calls(tag)[0])
        assert not blocked.outcomes[0].ok and blocked.outcomes[0].count == 5
    finally:
        await raw.aclose()
        await store.close()
        await relay.close()


async def test_a_caller_cancelled_before_its_batch_went_out_is_not_sent(
    redis_server: RedisServer,
):
    store = RedisStore(redis_server.url, prefix="c:")
    raw = aioredis.Redis.from_url(redis_server.url)
    key = f"rl:{uuid.uuid4().hex}"
    item = SlotRequest(key, 10, 60.0, 0.0)
    try:
        await store.start()
        gone = asyncio.ensure_future(store.reserve([item]))
        kept = asyncio.ensure_future(store.reserve([item]))
        await asyncio.sleep(0)  # both have joined the batch, which has not gone out yet
        gone.cancel()
        assert (await kept).outcomes[0].ok
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await raw.zcard(f"c:{key}") == 1
    finally:
        await raw.aclose()
        await store.close()
