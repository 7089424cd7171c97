"""Auto-pipelining of the Redis store's reservations (`proxy.store.redis`): the calls issued in
one event-loop iteration join one batch, one EVALSHA for the whole batch, each call all-or-nothing
on its own in the script.

Per batch round trip on the slim client (proxy.store.resp), with a connection free: no Task, no
future but the callers', no timer of its own. A `call_soon`ed function writes the packed command
to an idle connection, whose protocol hands the reply back to `_reply`; one timer watches the
deadlines of every batch in flight (they are sent in deadline order: `timeout` is the same for
all), armed for the oldest. A Task takes over only on the rare turns: no idle connection open
(connect), a connection that died (one retry, on a fresh connection: a Redis restart), NOSCRIPT
(load the script, run again). Through redis-py (a URL only redis-py reads), a Task per batch.

A batch that waits for a connection stays open (later calls join it), up to `pool_timeout`; it
then holds that connection for at most `timeout`, retries included. A call whose caller was
cancelled before its batch went out is not sent; a connection whose reply did not come in time is
closed, never reused. Each failure is every call's of the batch: each applies its own
on_store_error.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hiredis
from redis.exceptions import RedisError

from proxy.store import resp
from proxy.store.base import StoreError
from proxy.store.redis_scripts import RESERVE_LUA

__all__ = ["ERRORS", "RESERVE_SHA", "Batches", "Shape", "reservation_id"]

# What a failed Redis call raises: redis-py's errors, the slim client's (proxy.store.resp) error
# replies, and socket errors from either.
ERRORS = (RedisError, OSError, resp.ReplyError)
RESERVE_SHA = hashlib.sha1(RESERVE_LUA.encode()).hexdigest()


# Reservation ids need only be unique among the reservations of a window (the script's replay
# check: redis_scripts): a random prefix per process and a counter, rather than a getrandom
# syscall per call. A forked worker draws its own prefix (workers fork after importing this).
_rid_prefix = secrets.token_hex(8)
_rid_count = itertools.count()


def _new_rid_prefix() -> None:
    global _rid_prefix, _rid_count
    _rid_prefix = secrets.token_hex(8)
    _rid_count = itertools.count()


os.register_at_fork(after_in_child=_new_rid_prefix)


def reservation_id() -> str:
    return f"{_rid_prefix}{next(_rid_count):x}"


def _bulk(value: Any) -> bytes:
    data = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Shape:
    """What a call's items make of a batch, built once per items (proxy.store.redis keeps it):
    its KEYS and the items' part of its ARGV share, as values and as RESP. Only the clock and
    the reservation id differ from one call to the next."""

    __slots__ = ("count", "keys", "keys_wire", "tail", "tail_wire")

    def __init__(self, keys: list[str], tail: list[Any], count: int) -> None:
        self.keys = keys
        self.tail = tail
        self.count = count  # items
        self.keys_wire = b"".join(_bulk(key) for key in keys)
        self.tail_wire = _bulk(count) + b"".join(_bulk(value) for value in tail)


# One call of a batch: its shape, (now, reservation id), the caller's future.
_Call = tuple[Shape, tuple[str, str], "asyncio.Future[Any]"]


class _Batch:
    """Calls that go to Redis in one script run, in the order they came; once sent (slim
    client), the connection it waits on and the deadline of its reply."""

    __slots__ = ("calls", "conn", "deadline", "on_slot", "timer")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.conn: resp.Connection | None = None
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.on_slot: Callable[[], None] | None = None


def _fail(calls: list[_Call], error: StoreError) -> None:
    for _, _, future in calls:
        if not future.done():
            future.set_exception(error)


def _settle(calls: list[_Call], raw: Any) -> None:
    for i, (_, _, future) in enumerate(calls):
        if not future.done():
            future.set_result((raw[2 * i], raw[2 * i + 1]))


def _keys_args(calls: list[_Call], resend: bool) -> tuple[list[str], list[Any]]:
    """A batch's KEYS and ARGV: every call's keys, then the call count, whether the script
    must look for a first run of it (`resend`: a reply may have been lost), and every call's
    share."""
    keys: list[str] = []
    args: list[Any] = [len(calls), "1" if resend else "0"]
    for shape, (now, rid), _ in calls:
        keys += shape.keys
        args += (now, rid, shape.count, *shape.tail)
    return keys, args


_EVALSHA = b"$7\r\nEVALSHA\r\n" + _bulk(RESERVE_SHA)


def _payload(calls: list[_Call], resend: bool) -> bytes:
    """The batch's EVALSHA as RESP (what `_keys_args` would pack): each call's shape
    encoded once, only its clock and reservation id here."""
    nkeys = nargs = 0
    keys: list[bytes] = []
    args: list[bytes] = [_bulk(len(calls)), b"$1\r\n1\r\n" if resend else b"$1\r\n0\r\n"]
    for shape, (now, rid), _ in calls:
        nkeys += len(shape.keys)
        nargs += 3 + len(shape.tail)
        keys.append(shape.keys_wire)
        args += (_bulk(now), _bulk(rid), shape.tail_wire)
    head = b"*%d\r\n" % (3 + nkeys + 2 + nargs) + _EVALSHA + _bulk(nkeys)
    return b"".join((head, *keys, *args))


class Batches:
    """The store's reservation batches. `reserve` (redis-py's path only) runs one batch's
    EVALSHA given its KEYS and ARGV; `slots` are the store's, shared with its other calls."""

    def __init__(
        self,
        wire: resp.Wire | None,
        slots: resp.Slots,
        reserve: Callable[[list[str], list[Any]], Awaitable[Any]],
        *,
        timeout: float,
        pool_timeout: float,
        pool_size: int,
        max_batch: int,
    ) -> None:
        self._wire = wire
        self._slots = slots
        self._reserve = reserve
        self._timeout = timeout
        self._pool_timeout = pool_timeout
        self._pool_size = pool_size
        self._max_batch = max_batch
        # The batch the next reservations join (see enqueue); the tasks sending batches; the
        # batches sent on the slim client, oldest first, whose deadline one timer watches; the
        # batches waiting for a connection.
        self._open: _Batch | None = None
        self._senders: set[asyncio.Task[None]] = set()
        self._flying: deque[_Batch] = deque()
        self._watch: asyncio.TimerHandle | None = None
        self._waiting: set[_Batch] = set()

    def no_connection(self, what: str) -> StoreError:
        return StoreError(
            f"redis {what}: no free connection within {self._pool_timeout:g}s"
            f" (pool_size {self._pool_size})"
        )

    def enqueue(self, calls: list[tuple[Shape, tuple[str, str]]]) -> list[asyncio.Future[Any]]:
        """Add calls to the batch that goes out next; the calls given together stay together
        (one script run) unless they alone exceed `max_batch`."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for start in range(0, len(calls), self._max_batch):
            chunk = calls[start : start + self._max_batch]
            batch = self._open
            if batch is None or len(batch.calls) + len(chunk) > self._max_batch:
                # The first call of a loop iteration opens a batch; its sender first runs on
                # the loop's next iteration, so every call issued before then joins it (and
                # any issued while it waits for a free connection).
                batch = self._open = _Batch()
                if self._wire is not None:
                    loop.call_soon(self._flush, batch)
                else:
                    self._spawn(self._send(batch))
            queue = batch.calls
            for shape, head in chunk:
                future = loop.create_future()
                queue.append((shape, head, future))
                futures.append(future)
        return futures

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    async def _send(self, batch: _Batch) -> None:
        try:
            await self._run(batch)
        except BaseException:
            # Cancelled (the store is closing) or a bug: no caller may wait forever.
            _fail(batch.calls, StoreError("redis reserve: the store is closing"))
            raise

    async def _run(self, batch: _Batch) -> None:
        """Run one batch through redis-py: wait for a connection (up to pool_timeout, from the
        batch's first call), then one EVALSHA for every call in it, bounded by `timeout`. A
        failure is every call's failure: each caller applies its own on_store_error."""
        error: StoreError | None = None
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.take()
        except TimeoutError:
            error = self.no_connection("reserve")
        finally:
            if self._open is batch:
                self._open = None  # closed: later calls open the next batch
        if error is not None:
            _fail(batch.calls, error)
            return
        try:
            # A caller cancelled before its call went out (its client left): not sent at all.
            live = [call for call in batch.calls if not call[2].done()]
            if not live:
                return
            keys, args = _keys_args(live, True)  # redis-py resends on a failed connection
            async with asyncio.timeout(self._timeout):
                raw = await self._reserve(keys, args)
        except TimeoutError:
            error = StoreError(f"redis reserve: no answer within {self._timeout:g}s")
        except ERRORS as exc:
            error = StoreError(f"redis reserve: {str(exc) or type(exc).__name__}")
        finally:
            self._slots.give()
        if error is not None:
            _fail(batch.calls, error)
            return
        _settle(live, raw)

    # The slim client's path: no Task per batch. `_flush` runs on the loop iteration after the
    # batch's first call; with a connection free it writes the batch's EVALSHA straight to it
    # (`_go`), and the connection's protocol calls `_reply` with the answer. Only the rare
    # turns go through a Task (`_retry`): no idle connection open, a connection that died (one
    # retry on a fresh one), NOSCRIPT. Timers: one for the batches in flight (`_watchdog`, armed
    # for the oldest deadline), one per batch only while it waits for a connection.

    def _flush(self, batch: _Batch) -> None:
        if self._slots.try_take():
            self._go(batch)
            return
        if all(call[2].done() for call in batch.calls):
            self._close(batch)
            return
        # Every connection busy: the batch stays open (later calls join it) until one is free.
        loop = asyncio.get_running_loop()
        batch.timer = loop.call_at(loop.time() + self._pool_timeout, self._no_slot, batch)
        batch.on_slot = partial(self._got_slot, batch)
        self._waiting.add(batch)
        self._slots.wait(batch.on_slot)

    def _close(self, batch: _Batch) -> None:
        if self._open is batch:
            self._open = None  # later calls open the next batch

    def _got_slot(self, batch: _Batch) -> None:
        assert batch.timer is not None
        batch.timer.cancel()
        self._waiting.discard(batch)
        self._go(batch)

    def _no_slot(self, batch: _Batch) -> None:
        assert batch.on_slot is not None
        self._slots.cancel_wait(batch.on_slot)
        self._waiting.discard(batch)
        self._close(batch)
        _fail(batch.calls, self.no_connection("reserve"))

    def _go(self, batch: _Batch) -> None:
        """Send a batch that holds a slot: on an idle connection if one is open."""
        self._close(batch)
        # A caller cancelled before its call went out (its client left): not sent at all.
        live = batch.calls = [call for call in batch.calls if not call[2].done()]
        if not live:
            self._slots.give()
            return
        loop = asyncio.get_running_loop()
        batch.deadline = loop.time() + self._timeout
        conn = self._wire.take()  # type: ignore[union-attr]
        if conn is None:
            self._spawn(self._retry(batch, None))
            return
        batch.conn = conn
        conn.send(_payload(live, False), partial(self._reply, batch))
        self._flying.append(batch)
        if self._watch is None:
            self._watch = loop.call_at(batch.deadline, self._watchdog)

    def _reply(self, batch: _Batch, raw: Any, error: Exception | None) -> None:
        conn, batch.conn = batch.conn, None
        assert conn is not None
        flying = self._flying
        while flying and flying[0].conn is None:
            flying.popleft()
        if error is None:
            self._wire.keep(conn)  # type: ignore[union-attr]
            if type(raw) is not hiredis.ReplyError:
                self._slots.give()
                self._answer(batch.calls, raw)
                return
            error = resp.ReplyError(str(raw))
            if not str(error).startswith("NOSCRIPT"):
                self._slots.give()
                _fail(batch.calls, StoreError(f"redis reserve: {str(error) or 'ReplyError'}"))
                return
        # The connection died (one retry, on a fresh one) or Redis lost the script (load it).
        self._spawn(self._retry(batch, error))

    @staticmethod
    def _answer(calls: list[_Call], raw: Any) -> None:
        try:
            _settle(calls, raw)
        except (TypeError, IndexError, ValueError):
            _fail(calls, StoreError(f"redis reserve: unexpected reply {raw!r:.80}"))

    async def _resend(self, payload: bytes, first: Exception | None) -> Any:
        wire = self._wire
        assert wire is not None
        if not isinstance(first, resp.ReplyError):
            try:
                return await wire.execute(payload, fresh=first is not None)
            except resp.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
        await wire.execute(resp.pack("SCRIPT", "LOAD", RESERVE_LUA))
        return await wire.execute(payload)

    def _watchdog(self) -> None:
        """Fail the batches whose reply is overdue; rearm for the oldest still in flight."""
        self._watch = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        flying = self._flying
        while flying:
            batch = flying[0]
            if batch.conn is not None and batch.deadline > now:
                self._watch = loop.call_at(batch.deadline, self._watchdog)
                return
            flying.popleft()
            if batch.conn is not None:
                self._drop(batch, StoreError(f"redis reserve: no answer within {self._timeout:g}s"))

    def _drop(self, batch: _Batch, error: StoreError) -> None:
        conn, batch.conn = batch.conn, None
        assert conn is not None
        conn.abandon()  # its reply may still come: never reused
        self._slots.give()
        _fail(batch.calls, error)

    async def _retry(self, batch: _Batch, first: Exception | None) -> None:
        """The rare turns of a sent batch, within its deadline: `first` None (no idle connection
        was open: connect), a ConnectionError (one retry, on a fresh connection), a NOSCRIPT
        ReplyError (load the script, run again)."""
        error: StoreError | None = None
        try:
            async with asyncio.timeout_at(batch.deadline):
                # Every send from here on may follow a run whose reply was lost.
                raw = await self._resend(_payload(batch.calls, True), first)
        except TimeoutError:
            error = StoreError(f"redis reserve: no answer within {self._timeout:g}s")
        except ERRORS as exc:
            error = StoreError(f"redis reserve: {str(exc) or type(exc).__name__}")
        except BaseException:
            _fail(batch.calls, StoreError("redis reserve: the store is closing"))
            raise
        finally:
            self._slots.give()
        if error is not None:
            _fail(batch.calls, error)
            return
        self._answer(batch.calls, raw)

    async def close(self) -> None:
        """Fail every call not answered yet, cancel the tasks, close the connections in use."""
        closing = StoreError("redis reserve: the store is closing")
        if self._open is not None:
            _fail(self._open.calls, closing)
            self._open = None
        for batch in self._waiting:
            assert batch.timer is not None and batch.on_slot is not None
            batch.timer.cancel()
            self._slots.cancel_wait(batch.on_slot)
            _fail(batch.calls, closing)
        self._waiting.clear()
        while self._flying:
            batch = self._flying.popleft()
            if batch.conn is not None:
                self._drop(batch, closing)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for task in list(self._senders):
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
