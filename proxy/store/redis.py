"""Redis store: one set of limits, ledgers and stashes shared by every replica.

Each reservation is one atomic round trip: a Lua script (`proxy.store.redis_scripts`; loaded
once, run with EVALSHA, reloaded on NOSCRIPT) checks every item against the Redis server's clock
(`TIME`), records nothing if an enforced item fails and otherwise records every passing item.
Semantics match MemoryStore exactly.

Key layout (all under the configured prefix, e.g. `callgate:`):

    <prefix><item key>          ZSET, the sliding-window log: one member per recorded call,
                                score = server time in integer microseconds,
                                member = "<reservation id>.<item index>:<micro-units>"
    <prefix>sum:<item key>      STRING, the ledger's running total in integer micro-units
                                (budgets only; INCRBY/DECRBY, never a Lua float for money)
    <prefix>stash:...           STRING, a stashed blocked call (SET PX ttl)
    <prefix>approval:<id>       HASH {state, record}: a human approval (PEXPIRE keep)
    <prefix>approval-for:<dg>   STRING, the id of the approval open for a call digest
    <prefix>approvals           ZSET of approval ids, score = kept-until (ms): the listing
    <prefix>approval-events     LIST of approval events the CLI made, for a server to audit

Both keys of a ledger get the same PEXPIRE (the window, or max(window, cooldown) for a rate
limit) every time an entry is recorded, so a key vanishes once its newest entry is stale. A
missing total next to a non-empty log (evicted, deleted by hand) is rebuilt from the log's
members: the members are the truth. Timestamps and amounts are integers below 2**53, exact in
Lua's doubles; numbers going back to Redis are formatted with `%d`, never `tostring` (which
rounds to 14 digits).

Client: reservations, releases, stashes and pings go through a slim RESP client
(proxy.store.resp: an asyncio.Protocol with hiredis's parser, a fraction of redis-py's CPU per
round trip); approvals, and everything when the URL has options only redis-py reads, through
redis-py. Connections: a pool of `pool_size`, all opened (and both scripts loaded) by `start()`
before the app serves, so a burst right after start does not open connections and load scripts
once per request (redis-py opens its own, for approvals, when first needed). A call first waits
for a free connection, up to `pool_timeout` (waiting is local queueing, not Redis being slow; a
wait past it is a store error all the same), then holds it for at most `timeout`: connect if the
connection is down, send, read, and one retry on a fresh connection (which is what lets the pool
survive a Redis restart). A connection that dies after Redis ran a reservation but before the
reply arrived is retried with the same reservation id; the script finds that reservation's
members already recorded and records nothing again.

Redis Cluster is not supported: the keys of one reservation (a rate-limit log and a ledger)
usually hash to different slots. Use a single primary (with replicas / Sentinel for failover).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import hiredis
import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from proxy.store import resp
from proxy.store.base import ChargeRequest, Outcome, Reservation, SlotRequest, StoreError
from proxy.store.redis_batch import ERRORS as _ERRORS
from proxy.store.redis_batch import RESERVE_SHA as _RESERVE_SHA
from proxy.store.redis_batch import Batches, Shape, reservation_id
from proxy.store.redis_scripts import (
    FIND_APPROVAL_LUA,
    PUT_APPROVAL_LUA,
    RELEASE_LUA,
    RESERVE_LUA,
    UPDATE_APPROVAL_LUA,
)

__all__ = ["LIMITS", "MAX_BATCH", "MAX_EXACT", "RELEASE_LUA", "RESERVE_LUA", "RedisStore"]

T = TypeVar("T")
log = structlog.get_logger("callgate.store")

# Largest integer a Lua number (a double) holds exactly.
MAX_EXACT = 2**53 - 1
LIMITS = ("", "max_calls", "cooldown", "max_spend")
# Calls per script run: Redis runs one script at a time, so this bounds how long one batch holds
# it up (~44 us of Redis time per call: ~3 ms at 64), and a batch is one reply to parse.
MAX_BATCH = 64
MAX_SHAPES = 16_384  # calls' shapes kept, one per distinct items (about 10 MiB at most)


_RELEASE_SHA = hashlib.sha1(RELEASE_LUA.encode()).hexdigest()


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _reservation(items: Sequence[SlotRequest | ChargeRequest], raw: Any) -> Reservation:
    flat, members = raw
    outcomes: list[Outcome] = []
    for i in range(len(items)):
        ok, limit, count, elapsed, spent, retry = flat[6 * i : 6 * i + 6]
        outcomes.append(
            Outcome(
                bool(ok),
                LIMITS[limit],
                count=count,
                elapsed=elapsed / 1_000_000,
                spent_micros=spent,
                retry_after=None if retry < 0 else retry / 1_000_000,
            )
        )
    token = [
        (item.key, member.decode()) for item, member in zip(items, members, strict=True) if member
    ]
    return Reservation(outcomes, token)


class RedisStore:
    """The shared store. `clock` (tests only) replaces the server's TIME in reservations."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.5,
        pool_size: int = 32,
        pool_timeout: float = 5.0,
        prefix: str = "callgate:",
        clock: Callable[[], float] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._timeout = timeout
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._prefix = prefix
        self._clock = clock
        # One slot per pooled connection: a call holds a slot for exactly as long as it holds a
        # connection, so the wait for a slot is the wait for a connection, timed on its own
        # (`pool_timeout`), and `timeout` starts only once a connection is ours. The blocking
        # pool never makes a caller wait (a slot guarantees a free connection); it is there so
        # an excess caller would wait rather than fail with "Too many connections".
        self._slots = resp.Slots(pool_size)
        self._warm = False
        self._warming = asyncio.Lock()
        # One quick retry on a fresh connection: after a Redis restart every pooled connection
        # is dead, and the first command on each fails once. The whole call stays bounded by
        # `timeout` (see _call), retries included.
        # The hot path (reservations, releases, stashes, pings) goes through the slim client
        # (proxy.store.resp): its connections are the pool that `start()` opens. redis-py
        # serves the rest (approvals), opening its connections when first needed, and
        # everything where the URL carries options only redis-py understands.
        self._wire = resp.Wire(url) if resp.supports(url) else None
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=pool_timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        self._pool = pool
        self._redis = Redis.from_pool(pool)
        self._release = self._run_release
        self._put_approval = self._redis.register_script(PUT_APPROVAL_LUA)
        self._find_approval = self._redis.register_script(FIND_APPROVAL_LUA)
        self._update_approval = self._redis.register_script(UPDATE_APPROVAL_LUA)
        self._shapes: dict[int, tuple[Sequence[SlotRequest | ChargeRequest], Shape]] = {}
        self._batches = Batches(
            self._wire,
            self._slots,
            self._run_reserve,
            timeout=timeout,
            pool_timeout=pool_timeout,
            pool_size=pool_size,
            max_batch=max_batch,
        )
        self._enqueue = self._batches.enqueue

    async def start(self) -> None:
        """Warm up before serving. Redis being down is not fatal here: /readyz reports it (and
        warms up once Redis answers), and calls meanwhile apply on_store_error."""
        try:
            await self._warm_up()
        except StoreError as exc:
            log.warning("store_warm_up_failed", error=str(exc))

    async def _warm_up(self) -> None:
        async with self._warming:
            if not self._warm:
                await self._open_all()
                self._warm = True

    async def _open_all(self) -> None:
        """Open every connection of the pool and load both scripts (a fresh Redis has none).

        Holds every slot meanwhile, so no call competes for the connections being opened.
        """
        held = 0
        opened: list[AbstractConnection] = []
        wired: list[resp.Connection] = []

        async def open_one() -> None:
            # Nothing awaits between the pool handing a connection over and its being listed,
            # so a cancellation cannot lose one (get_connection returns it to the pool itself
            # if cancelled while connecting).
            if self._wire is not None:
                wired.append(await self._wire.connect())
            else:
                opened.append(await self._pool.get_connection())

        try:
            async with asyncio.timeout(self._pool_timeout):
                while held < self._pool_size:
                    await self._slots.take()
                    held += 1
            async with asyncio.timeout(self._pool_timeout):
                # Not `finally:` - compiled (proxy.native), an await in a finally block
                # re-raises whatever exception the caller is handling, even on success.
                try:
                    await asyncio.gather(*(open_one() for _ in range(self._pool_size)))
                except BaseException:
                    await self._keep_opened(opened, wired)
                    raise
                await self._keep_opened(opened, wired)
                # EVALSHA then finds them: no NOSCRIPT round trip on the first calls. (After a
                # Redis restart, _evalsha reloads on NOSCRIPT.)
                for script in (RESERVE_LUA, RELEASE_LUA):
                    await self._command("SCRIPT", "LOAD", script)
        except TimeoutError:
            raise StoreError(
                f"redis warm-up: not done within {self._pool_timeout:g}s"
                f" ({len(opened) + len(wired)} of {self._pool_size} connections open)"
            ) from None
        except _ERRORS as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreError(f"redis warm-up: {detail}") from None
        finally:
            for _ in range(held):
                self._slots.give()

    async def _keep_opened(
        self, opened: list[AbstractConnection], wired: list[resp.Connection]
    ) -> None:
        for conn in opened:
            await self._pool.release(conn)
        for wire_conn in wired:
            self._wire.keep(wire_conn)  # type: ignore[union-attr]

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        if not self._slots.try_take():
            try:
                async with asyncio.timeout(self._pool_timeout):
                    await self._slots.take()
            except TimeoutError:
                raise self._batches.no_connection(what) from None
        try:
            async with asyncio.timeout(self._timeout):
                return await op()
        except TimeoutError:
            raise StoreError(f"redis {what}: no answer within {self._timeout:g}s") from None
        except _ERRORS as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreError(f"redis {what}: {detail}") from None
        finally:
            self._slots.give()

    async def _command(self, *args: Any) -> Any:
        """One command: through the slim client, or redis-py where the URL needs it."""
        if self._wire is not None:
            return await self._wire.execute(hiredis.pack_command(args))
        return await self._redis.execute_command(*args)

    async def _evalsha(self, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self._command(*command)
        except (resp.ReplyError, NoScriptError) as exc:
            if isinstance(exc, resp.ReplyError) and not str(exc).startswith("NOSCRIPT"):
                raise
        # A Redis that restarted (or whose scripts were flushed) has lost it: load, run again.
        await self._command("SCRIPT", "LOAD", script)
        return await self._command(*command)

    async def _run_reserve(self, keys: list[str], args: list[Any]) -> Any:
        return await self._evalsha(RESERVE_LUA, _RESERVE_SHA, keys, args)

    async def _run_release(self, keys: list[str], args: list[Any]) -> Any:
        return await self._evalsha(RELEASE_LUA, _RELEASE_SHA, keys, args)

    def _keys(self, key: str) -> tuple[str, str]:
        return self._prefix + key, f"{self._prefix}sum:{key}"

    def _call_args(
        self, items: Sequence[SlotRequest | ChargeRequest]
    ) -> tuple[Shape, tuple[str, str]]:
        """One call's shape (kept per items: the gates build a call's items once per tool and
        principal, as a tuple) and its clock and reservation id."""
        now = "" if self._clock is None else str(_micros(self._clock()))
        # Only a tuple's shape is kept: a list (any other sequence) may be given again with
        # other content, and would be answered with the old keys and limits.
        keep = type(items) is tuple
        kept = self._shapes.get(id(items)) if keep else None
        if kept is not None and kept[0] is items:
            return kept[1], (now, reservation_id())
        keys: list[str] = []
        tail: list[Any] = []
        prefix = self._prefix
        for item in items:
            key = item.key
            keys += (prefix + key, f"{prefix}sum:{key}")
            window = _micros(item.window)
            if isinstance(item, SlotRequest):
                cooldown = _micros(item.cooldown)
                max_calls = -1 if item.max_calls is None else item.max_calls
                tail += ["s", int(item.enforce), window, max(window, cooldown), max_calls, cooldown]
            else:
                if max(item.max_micros, item.cost_micros) > MAX_EXACT:
                    raise StoreError(f"redis reserve: amount too large for {item.key}")
                tail += ["c", int(item.enforce), window, window, item.max_micros, item.cost_micros]
        shape = Shape(keys, tail, len(items))
        if keep:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()  # principals x tools outgrew it: start over
            self._shapes[id(items)] = (items, shape)  # kept alive: their id stays theirs
        return shape, (now, reservation_id())

    async def reserve(self, items: Sequence[SlotRequest | ChargeRequest]) -> Reservation:
        if not items:
            return Reservation([])
        future = self._enqueue([self._call_args(items)])[0]
        return _reservation(items, await future)

    async def reserve_many(
        self, calls: Sequence[Sequence[SlotRequest | ChargeRequest]]
    ) -> list[Reservation | StoreError]:
        """Several calls' reservations (one response's tool calls, in order) in one round trip,
        each all-or-nothing on its own. A call the store could not answer gets the StoreError
        in its place, so each call applies its own on_store_error."""
        results: list[Reservation | StoreError | None] = [None] * len(calls)
        batch: list[tuple[Shape, tuple[str, str]]] = []
        sent: list[int] = []
        for i, items in enumerate(calls):
            if not items:
                results[i] = Reservation([])
                continue
            try:
                batch.append(self._call_args(items))
            except StoreError as exc:
                results[i] = exc
                continue
            sent.append(i)
        futures = self._enqueue(batch)
        for i, future in zip(sent, futures, strict=True):
            try:
                results[i] = _reservation(calls[i], await future)
            except StoreError as exc:
                results[i] = exc
        return results  # type: ignore[return-value]

    async def release(self, token: list[tuple[str, str]]) -> None:
        if not token:
            return
        keys: list[str] = []
        for key, _member in token:
            keys.extend(self._keys(key))
        members = [member for _key, member in token]
        await self._call("release", lambda: self._release(keys=keys, args=members))

    async def put_stash(self, key: str, value: bytes, ttl: float) -> None:
        px = max(1, math.ceil(ttl * 1000))
        full = self._prefix + key
        await self._call("stash write", lambda: self._command("SET", full, value, "PX", px))

    async def get_stash_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        full = [self._prefix + k for k in keys]
        found = await self._call("stash read", lambda: self._command("MGET", *full))
        # Replies are bytes (decode_responses is off); str only in redis-py's general typing.
        return [v.encode() if isinstance(v, str) else v for v in found]

    def _approval_key(self, approval_id: str) -> str:
        return f"{self._prefix}approval:{approval_id}"

    def _digest_key(self, digest: str) -> str:
        return f"{self._prefix}approval-for:{digest}"

    async def put_approval(self, approval_id: str, digest: str, record: bytes, keep: float) -> str:
        keys = [self._digest_key(digest), self._approval_key(approval_id)]
        keys.append(self._prefix + "approvals")
        now_ms = round((self._clock or time.time)() * 1000)
        args: list[str | bytes | int] = [
            approval_id,
            record,
            max(1, math.ceil(keep * 1000)),
            now_ms,
            self._prefix + "approval:",
        ]
        found = await self._call("approval write", lambda: self._put_approval(keys, args))
        return found.decode() if isinstance(found, bytes) else str(found)

    async def find_approval(self, digest: str) -> bytes | None:
        keys = [self._digest_key(digest)]
        args = [self._prefix + "approval:"]
        found = await self._call("approval read", lambda: self._find_approval(keys, args))
        return found or None

    async def get_approval(self, approval_id: str) -> bytes | None:
        key = self._approval_key(approval_id)
        found = await self._call("approval read", lambda: self._redis.hget(key, "record"))
        return found.encode() if isinstance(found, str) else found

    async def update_approval(
        self, approval_id: str, digest: str, expect: str, state: str, record: bytes
    ) -> bool:
        keys = [self._approval_key(approval_id), self._digest_key(digest)]
        args: list[str | bytes] = [expect, state, record, approval_id]
        done = await self._call("approval write", lambda: self._update_approval(keys, args))
        return bool(done)

    async def list_approvals(self, limit: int) -> list[bytes]:
        index = self._prefix + "approvals"
        now_ms = round((self._clock or time.time)() * 1000)

        async def listing() -> list[bytes]:
            await self._redis.zremrangebyscore(index, "-inf", now_ms)
            ids = await self._redis.zrange(index, -limit, -1)
            if not ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for approval_id in ids:
                name = approval_id.decode() if isinstance(approval_id, bytes) else str(approval_id)
                pipe.hget(self._approval_key(name), "record")
            return [r for r in await pipe.execute() if r]

        return await self._call("approval list", listing)

    async def push_approval_event(self, event: bytes) -> None:
        key = self._prefix + "approval-events"
        await self._call("approval event", lambda: self._redis.rpush(key, event))

    async def pop_approval_events(self, count: int) -> list[bytes]:
        key = self._prefix + "approval-events"
        found = await self._call("approval event", lambda: self._redis.lpop(key, count))
        return list(found or [])  # type: ignore[arg-type]

    async def ping(self) -> None:
        if not self._warm:
            # Start-up could not warm up (Redis was down): ready only once it has.
            await self._warm_up()
        await self._call("ping", lambda: self._command("PING"))

    async def close(self) -> None:
        await self._batches.close()
        if self._wire is not None:
            self._wire.close()
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass
