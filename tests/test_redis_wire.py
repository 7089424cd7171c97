"""The Redis store's slim client (proxy.store.resp) on a real redis-server: credentials and
database from the URL, a command cut off by its timeout never answers a later one, and a URL
with options only redis-py understands sends everything through redis-py, same answers.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from proxy.store import SlotRequest, StoreError
from proxy.store.redis import RedisStore
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_redis_burst import DelayProxy, client_count
from tests.test_redis_pipelining import evalsha_calls


async def test_user_password_and_database_from_the_url(redis_server: RedisServer):
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.acl_setuser("gate", enabled=True, passwords=["+s3cr:t"], keys="*", commands=["+@all"])
    await raw.config_set("requirepass", "adminpw")
    await raw.aclose()
    port = redis_server.port
    admin = aioredis.Redis.from_url(f"redis://:adminpw@127.0.0.1:{port}/0")
    try:
        for url in (
            f"redis://gate:s3cr%3At@127.0.0.1:{port}/5",
            f"redis://:adminpw@127.0.0.1:{port}/5",
        ):
            store = RedisStore(url, pool_size=2, prefix=f"{uuid.uuid4().hex}:")
            try:
                await store.start()
                await store.ping()
                assert (await store.reserve([SlotRequest("rl:a", 5, 60, 0)])).outcomes[0].ok
                await store.put_stash("s", b"v", 10)
                assert await store.get_stash_many(["s", "none"]) == [b"v", None]
            finally:
                await store.close()
        db5 = aioredis.Redis.from_url(f"redis://:adminpw@127.0.0.1:{port}/5")
        try:
            assert len(await db5.keys("*:rl:a")) == 2  # both stores wrote to database 5
        finally:
            await db5.aclose()
        assert await admin.keys("*") == []  # and nothing to database 0
        wrong = RedisStore(f"redis://gate:nope@127.0.0.1:{port}/5", pool_size=1, timeout=1)
        try:
            with pytest.raises(StoreError, match=r"WRONGPASS|invalid") as refused:
                await wrong.reserve([SlotRequest("rl:a", 5, 60, 0)])
            assert "nope" not in str(refused.value)  # the error names no credential
        finally:
            await wrong.close()
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def test_a_command_cut_off_by_its_timeout_does_not_answer_the_next(
    redis_server: RedisServer,
):
    """Redis answers the first call after its timeout; that late reply must not be taken as
    the answer to the next call on the same connection (one connection: pool_size 1)."""
    relay = DelayProxy(redis_server.port, delay=0.4)
    await relay.start()
    store = RedisStore(relay.url, timeout=0.2, pool_size=1, pool_timeout=5)
    key = f"rl:{uuid.uuid4().hex}"
    try:
        await store.start()
        with pytest.raises(StoreError, match=r"no answer within 0\.2s"):
            await store.reserve([SlotRequest(key, 10, 60, 0)])
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await asyncio.sleep(0.1)
            # Closed at once, before its late reply (which would have answered the next call).
            assert await client_count(raw) == 0
        finally:
            await raw.aclose()
        relay.delay = 0.0  # later connections answer at once
        await asyncio.sleep(0.4)  # the late reply would have arrived by now
        second = await store.reserve(
            [SlotRequest(key, 10, 60, 0), SlotRequest(key + "b", 10, 60, 0)]
        )
        # Its own answer: two outcomes; the first call did run in Redis (count 1 before it).
        assert [o.count for o in second.outcomes] == [1, 0]
        assert relay.connections == 2  # the cut-off connection was replaced
    finally:
        await store.close()
        await relay.close()


@pytest.mark.parametrize("query", ["", "?health_check_interval=0"])
async def test_both_clients_give_the_same_answers(redis_server: RedisServer, query: str):
    """Without a query string the hot path is the slim client; with one, redis-py."""
    store = RedisStore(redis_server.url + query, pool_size=3, prefix=f"{uuid.uuid4().hex}:")
    raw = aioredis.Redis.from_url(redis_server.url)
    assert (store._wire is None) == bool(query)
    try:
        await store.start()
        assert await client_count(raw) == 3
        before = await evalsha_calls(raw)
        item = SlotRequest("rl:x", 5, 60, 0)
        results = await store.reserve_many([[item]] * 7)
        assert await evalsha_calls(raw) == before + 1
        oks = [r.outcomes[0].ok for r in results]  # type: ignore[union-attr]
        assert oks == [True] * 5 + [False] * 2
        await store.release(results[0].token)  # type: ignore[union-attr]
        assert (await store.reserve([item])).outcomes[0].ok  # the slot given back
        await raw.script_flush()
        assert not (await store.reserve([item])).outcomes[0].ok  # NOSCRIPT: loaded, answered
        await store.put_stash("s", b"\x00bytes", 10)
        assert await store.get_stash_many(["s"]) == [b"\x00bytes"]
        await store.ping()
    finally:
        await raw.aclose()
        await store.close()
