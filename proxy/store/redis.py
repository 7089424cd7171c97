"""Redis store: one set of limits, ledgers and stashes shared by every replica.

Each reservation is one atomic round trip: a Lua script (loaded once, run with EVALSHA, reloaded
on NOSCRIPT) checks every item against the Redis server's clock (`TIME`), records nothing if an
enforced item fails and otherwise records every passing item. Semantics match MemoryStore exactly.

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

Connections: a pool of `pool_size`, all opened (and both scripts loaded) by `start()` before
the app serves, so a burst right after start does not open connections and load scripts once per
request. A call first waits for a free connection, up to `pool_timeout` (waiting is local
queueing, not Redis being slow; a wait past it is a store error all the same), then holds it for
at most `timeout`: connect if the connection is down, send, read, and one retry on a fresh
connection (which is what lets the pool survive a Redis restart). A connection that dies after
Redis ran a reservation but before the reply arrived is retried with the same reservation id;
the script finds that reservation's members already recorded and records nothing again.

Redis Cluster is not supported: the keys of one reservation (a rate-limit log and a ledger)
usually hash to different slots. Use a single primary (with replicas / Sentinel for failover).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.store.base import ChargeRequest, Outcome, Reservation, SlotRequest, StoreError

T = TypeVar("T")
log = structlog.get_logger("callgate.store")

# Largest integer a Lua number (a double) holds exactly.
MAX_EXACT = 2**53 - 1
LIMITS = ("", "max_calls", "cooldown", "max_spend")
# Calls per script run: Redis runs one script at a time, so this bounds how long one batch holds
# it up (~44 us of Redis time per call: ~3 ms at 64), and a batch is one reply to parse.
MAX_BATCH = 64

# One script run reserves a whole batch of calls, each all-or-nothing on its own, in order (a
# later call of the batch sees what an earlier one recorded, exactly as separate runs would).
# KEYS: two per item, the calls' items one after another: the item's log (ZSET) and its ledger
#   total (STRING, budgets only).
# ARGV: call count, then per call: now_us ("" = use the server's TIME), reservation id, item
#   count, then six per item:
#   kind ("s" slot | "c" charge), enforce ("1" | "0"), window_us, horizon_us,
#   slot: max_calls (-1 = none), cooldown_us    charge: max_micros, cost_micros
# Returns two tables per call, {outcomes, members, outcomes, members, ...}: outcomes is six
#   integers per item: ok (1|0), limit (0 none | 1 max_calls | 2 cooldown | 3 max_spend),
#   count, elapsed_us, spent_micros, retry_us (-1 = none);
# members is one string per item: the member recorded for it, or "" if nothing was recorded.
RESERVE_LUA = r"""
local function fmt(x) return string.format('%d', x) end
local function amount_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end

local server_now
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  if not server_now then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return server_now
end

-- One call: its arguments start at ARGV[a + 1], its keys after KEYS[k].
local function reserve(now, rid, n, a, k)
  local outcomes, members, passed = {}, {}, {}
  local blocked = false

  -- A retry of a reservation that already ran (its reply was lost): the script is atomic, so
  -- either every passing item of it was recorded or none. Found recorded: answer "granted" for
  -- what it recorded and record nothing again.
  local replay = false
  for i = 1, n do
    local b = a + (i - 1) * 6
    local amount = 0
    if ARGV[b + 1] == 'c' then amount = tonumber(ARGV[b + 6]) end
    local member = rid .. '.' .. i .. ':' .. fmt(amount)
    if redis.call('ZSCORE', KEYS[k + 2 * i - 1], member) then
      replay = true
      members[i] = member
    end
  end
  if replay then
    for i = 1, n do
      -- An item not recorded the first time was a shadow item that would have blocked; its
      -- report is lost with the first reply (shadow items never block).
      members[i] = members[i] or ''
      for _, v in ipairs({1, 0, 0, 0, 0, -1}) do table.insert(outcomes, v) end
    end
    return outcomes, members
  end

  for i = 1, n do
    local b = a + (i - 1) * 6
    local kind, enforce = ARGV[b + 1], ARGV[b + 2] == '1'
    local window, horizon = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    local x, y = tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6])
    local key, sumkey = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
    local ok, limit, count, elapsed, spent, retry = 1, 0, 0, 0, 0, -1

    if kind == 's' then
      local max_calls, cooldown = x, y
      -- An entry at t counts while t > now - horizon: exact at the boundary.
      redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - horizon))
      if max_calls >= 0 then
        count = redis.call('ZCOUNT', key, '(' .. fmt(now - window), '+inf')
      end
      if cooldown > 0 then
        local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
        if last[2] then
          local since = now - tonumber(last[2])
          if since < cooldown then
            ok, limit, elapsed, retry = 0, 2, since, cooldown - since
          end
        end
      end
      if ok == 1 and max_calls >= 0 and count >= max_calls then
        ok, limit = 0, 1
        if max_calls > 0 then
          local e = redis.call('ZRANGEBYSCORE', key, '(' .. fmt(now - window), '+inf',
            'WITHSCORES', 'LIMIT', count - max_calls, 1)
          retry = tonumber(e[2]) + window - now
        end
      end
    else
      local max_micros, cost = x, y
      local stale = redis.call('ZRANGEBYSCORE', key, '-inf', fmt(now - window))
      if #stale > 0 then
        local gone = 0
        for _, m in ipairs(stale) do gone = gone + amount_of(m) end
        redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
        if gone > 0 and redis.call('EXISTS', sumkey) == 1 then
          redis.call('DECRBY', sumkey, fmt(gone))
        end
      end
      if redis.call('ZCARD', key) == 0 then
        redis.call('DEL', sumkey)
      else
        local total = redis.call('GET', sumkey)
        if total then
          spent = tonumber(total)
        else
          -- The total is gone (evicted, deleted by hand): rebuild it from the log.
          for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do spent = spent + amount_of(m) end
          redis.call('SET', sumkey, fmt(spent))
          local ttl = redis.call('PTTL', key)
          if ttl > 0 then redis.call('PEXPIRE', sumkey, ttl) end
        end
      end
      if spent + cost > max_micros then
        ok, limit = 0, 3
        if cost <= max_micros then
          -- When enough of the oldest charges have aged out for this one to fit.
          local freed, start, found = 0, 0, false
          while not found do
            local page = redis.call('ZRANGE', key, start, start + 127, 'WITHSCORES')
            if #page == 0 then break end
            for j = 1, #page, 2 do
              freed = freed + amount_of(page[j])
              if spent - freed + cost <= max_micros then
                retry = tonumber(page[j + 1]) + window - now
                found = true
                break
              end
            end
            start = start + 128
          end
        end
      end
    end

    if ok == 0 and enforce then blocked = true end
    passed[i] = ok == 1
    table.insert(outcomes, ok)
    table.insert(outcomes, limit)
    table.insert(outcomes, count)
    table.insert(outcomes, elapsed)
    table.insert(outcomes, spent)
    table.insert(outcomes, retry)
  end

  for i = 1, n do
    local member = ''
    if not blocked and passed[i] then
      local b = a + (i - 1) * 6
      local kind, horizon = ARGV[b + 1], tonumber(ARGV[b + 4])
      local amount = 0
      if kind == 'c' then amount = tonumber(ARGV[b + 6]) end
      local key, sumkey = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
      local ttl = fmt(math.floor(horizon / 1000) + 1)
      member = rid .. '.' .. i .. ':' .. fmt(amount)
      redis.call('ZADD', key, fmt(now), member)
      redis.call('PEXPIRE', key, ttl)
      if kind == 'c' then
        redis.call('INCRBY', sumkey, fmt(amount))
        redis.call('PEXPIRE', sumkey, ttl)
      end
    end
    members[i] = member
  end
  return outcomes, members
end

local result = {}
local a, k = 1, 0
for _ = 1, tonumber(ARGV[1]) do
  local now, rid, n = clock(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
  local outcomes, members = reserve(now, rid, n, a + 3, k)
  table.insert(result, outcomes)
  table.insert(result, members)
  a = a + 3 + 6 * n
  k = k + 2 * n
end
return result
"""

# KEYS: two per entry: the log (ZSET) and its ledger total. ARGV: one member per entry.
RELEASE_LUA = r"""
for i = 1, #ARGV do
  local key, sumkey, member = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i]
  if redis.call('ZREM', key, member) == 1 then
    local amount = tonumber(string.match(member, ':(%d+)$')) or 0
    if redis.call('ZCARD', key) == 0 then
      redis.call('DEL', sumkey)
    elseif amount > 0 and redis.call('EXISTS', sumkey) == 1 then
      redis.call('DECRBY', sumkey, string.format('%d', amount))
    end
  end
end
return 0
"""


# Approvals: every change of state is a compare-and-set in one script, so two replicas racing
# for one grant cannot both use it.
# KEYS: digest key, record key, index. ARGV: id, record, keep_ms, now_ms, record key prefix.
PUT_APPROVAL_LUA = r"""
local current = redis.call('GET', KEYS[1])
if current then
  local state = redis.call('HGET', ARGV[5] .. current, 'state')
  if state == 'pending' or state == 'approved' or state == 'denied' then return current end
end
redis.call('HSET', KEYS[2], 'state', 'pending', 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[1])
return ARGV[1]
"""
# KEYS: digest key. ARGV: record key prefix. The open approval's record, or nil.
FIND_APPROVAL_LUA = r"""
local current = redis.call('GET', KEYS[1])
if not current then return false end
local found = redis.call('HMGET', ARGV[1] .. current, 'state', 'record')
if found[1] == 'pending' or found[1] == 'approved' or found[1] == 'denied' then
  return found[2]
end
return false
"""
# KEYS: record key, digest key. ARGV: expected state, new state, record, id.
UPDATE_APPROVAL_LUA = r"""
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'record', ARGV[3])
local open = ARGV[2] == 'pending' or ARGV[2] == 'approved' or ARGV[2] == 'denied'
if not open and redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return 1
"""


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


# The calls of one batch: (keys, ARGV share, the caller's future), in the order they came.
_Batch = list[tuple[list[str], list[Any], "asyncio.Future[Any]"]]


def _fail(batch: _Batch, error: StoreError) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(error)


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
        self._max_batch = max_batch
        # The batch the next reservations join (see _enqueue), and the tasks sending batches.
        self._open: _Batch | None = None
        self._senders: set[asyncio.Task[None]] = set()
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._prefix = prefix
        self._clock = clock
        # One slot per pooled connection: a call holds a slot for exactly as long as it holds a
        # connection, so the wait for a slot is the wait for a connection, timed on its own
        # (`pool_timeout`), and `timeout` starts only once a connection is ours. The blocking
        # pool never makes a caller wait (a slot guarantees a free connection); it is there so
        # an excess caller would wait rather than fail with "Too many connections".
        self._slots = asyncio.Semaphore(pool_size)
        self._warm = False
        self._warming = asyncio.Lock()
        # One quick retry on a fresh connection: after a Redis restart every pooled connection
        # is dead, and the first command on each fails once. The whole call stays bounded by
        # `timeout` (see _call), retries included.
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
        self._reserve = self._redis.register_script(RESERVE_LUA)
        self._release = self._redis.register_script(RELEASE_LUA)
        self._put_approval = self._redis.register_script(PUT_APPROVAL_LUA)
        self._find_approval = self._redis.register_script(FIND_APPROVAL_LUA)
        self._update_approval = self._redis.register_script(UPDATE_APPROVAL_LUA)

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

        async def open_one() -> None:
            # Nothing awaits between the pool handing a connection over and its being listed,
            # so a cancellation cannot lose one (get_connection returns it to the pool itself
            # if cancelled while connecting).
            opened.append(await self._pool.get_connection())

        try:
            async with asyncio.timeout(self._pool_timeout):
                while held < self._pool_size:
                    await self._slots.acquire()
                    held += 1
            async with asyncio.timeout(self._pool_timeout):
                try:
                    await asyncio.gather(*(open_one() for _ in range(self._pool_size)))
                finally:
                    for conn in opened:
                        await self._pool.release(conn)
                # EVALSHA then finds them: no NOSCRIPT round trip on the first calls. (After a
                # Redis restart, Script reloads on NOSCRIPT by itself.)
                for script in (self._reserve, self._release):
                    await self._redis.script_load(script.script)
        except TimeoutError:
            raise StoreError(
                f"redis warm-up: not done within {self._pool_timeout:g}s"
                f" ({len(opened)} of {self._pool_size} connections open)"
            ) from None
        except (RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreError(f"redis warm-up: {detail}") from None
        finally:
            for _ in range(held):
                self._slots.release()

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise StoreError(
                f"redis {what}: no free connection within {self._pool_timeout:g}s"
                f" (pool_size {self._pool_size})"
            ) from None
        try:
            async with asyncio.timeout(self._timeout):
                return await op()
        except TimeoutError:
            raise StoreError(f"redis {what}: no answer within {self._timeout:g}s") from None
        except (RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreError(f"redis {what}: {detail}") from None
        finally:
            self._slots.release()

    def _keys(self, key: str) -> tuple[str, str]:
        return self._prefix + key, f"{self._prefix}sum:{key}"

    def _call_args(
        self, items: Sequence[SlotRequest | ChargeRequest]
    ) -> tuple[list[str], list[Any]]:
        """One call's keys and its share of the script's ARGV."""
        keys: list[str] = []
        now = "" if self._clock is None else str(_micros(self._clock()))
        args: list[Any] = [now, secrets.token_hex(8), len(items)]
        for item in items:
            keys.extend(self._keys(item.key))
            window = _micros(item.window)
            if isinstance(item, SlotRequest):
                cooldown = _micros(item.cooldown)
                max_calls = -1 if item.max_calls is None else item.max_calls
                args += ["s", int(item.enforce), window, max(window, cooldown), max_calls, cooldown]
            else:
                if max(item.max_micros, item.cost_micros) > MAX_EXACT:
                    raise StoreError(f"redis reserve: amount too large for {item.key}")
                args += ["c", int(item.enforce), window, window, item.max_micros, item.cost_micros]
        return keys, args

    async def reserve(self, items: Sequence[SlotRequest | ChargeRequest]) -> Reservation:
        if not items:
            return Reservation([])
        keys, args = self._call_args(items)
        future = self._enqueue([(keys, args)])[0]
        return _reservation(items, await future)

    async def reserve_many(
        self, calls: Sequence[Sequence[SlotRequest | ChargeRequest]]
    ) -> list[Reservation | StoreError]:
        """Several calls' reservations (one response's tool calls, in order) in one round trip,
        each all-or-nothing on its own. A call the store could not answer gets the StoreError
        in its place, so each call applies its own on_store_error."""
        results: list[Reservation | StoreError | None] = [None] * len(calls)
        batch: list[tuple[list[str], list[Any]]] = []
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

    def _enqueue(self, calls: list[tuple[list[str], list[Any]]]) -> list[asyncio.Future[Any]]:
        """Add calls to the batch that goes out next; the calls given together stay together
        (one script run) unless they alone exceed `max_batch`."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for start in range(0, len(calls), self._max_batch):
            chunk = calls[start : start + self._max_batch]
            batch = self._open
            if batch is None or len(batch) + len(chunk) > self._max_batch:
                # The first call of a loop iteration opens a batch; its sender first runs on
                # the loop's next iteration, so every call issued before then joins it (and
                # any issued while it waits for a free connection).
                batch = self._open = []
                task = loop.create_task(self._send(batch))
                self._senders.add(task)
                task.add_done_callback(self._senders.discard)
            for keys, args in chunk:
                future = loop.create_future()
                batch.append((keys, args, future))
                futures.append(future)
        return futures

    async def _send(self, batch: _Batch) -> None:
        try:
            await self._run(batch)
        except BaseException:
            # Cancelled (the store is closing) or a bug: no caller may wait forever.
            _fail(batch, StoreError("redis reserve: the store is closing"))
            raise

    async def _run(self, batch: _Batch) -> None:
        """Run one batch: wait for a connection (up to pool_timeout, from the batch's first
        call), then one EVALSHA for every call in it, bounded by `timeout`. A failure is every
        call's failure: each caller applies its own on_store_error."""
        error: StoreError | None = None
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            error = StoreError(
                f"redis reserve: no free connection within {self._pool_timeout:g}s"
                f" (pool_size {self._pool_size})"
            )
        finally:
            if self._open is batch:
                self._open = None  # closed: later calls open the next batch
        if error is not None:
            _fail(batch, error)
            return
        try:
            # A caller cancelled before its call went out (its client left): not sent at all.
            live = [call for call in batch if not call[2].done()]
            if not live:
                return
            keys: list[str] = []
            args: list[Any] = [len(live)]
            for call_keys, call_args, _ in live:
                keys += call_keys
                args += call_args
            async with asyncio.timeout(self._timeout):
                raw = await self._reserve(keys=keys, args=args)
        except TimeoutError:
            error = StoreError(f"redis reserve: no answer within {self._timeout:g}s")
        except (RedisError, OSError) as exc:
            error = StoreError(f"redis reserve: {str(exc) or type(exc).__name__}")
        finally:
            self._slots.release()
        if error is not None:
            _fail(batch, error)
            return
        for i, (_, _, future) in enumerate(live):
            if not future.done():
                future.set_result((raw[2 * i], raw[2 * i + 1]))

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
        await self._call("stash write", lambda: self._redis.set(self._prefix + key, value, px=px))

    async def get_stash_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        full = [self._prefix + k for k in keys]
        found = await self._call("stash read", lambda: self._redis.mget(full))
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
        await self._call("ping", self._redis.ping)

    async def close(self) -> None:
        for task in list(self._senders):
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass
