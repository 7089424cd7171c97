"""A slim RESP2 client for the Redis store's hot path: reservations, releases, stashes, pings.

Why not redis-py's asyncio client here: measured in bench.bench_store on this project's
machine, one redis-py round trip costs ~90 us of client CPU (the pool's lock, a retry wrapper, a
Task per send for `asyncio.wait_for`, a timeout context per read, observability hooks), several
times what Redis spends running the reservation script. This client is an asyncio.Protocol: the
command is packed by hiredis (C), written straight to the transport, and the reply parsed by
hiredis.Reader as it arrives: one future per round trip.

What it keeps of redis-py's behaviour, as the store relies on it:
- One request in flight per connection; the store's slots (one per connection) bound them.
- A connection that fails (refused, reset, closed mid-reply) is dropped, and the command is sent
  once more on a fresh connection: after a Redis restart every pooled connection is dead, and
  the first command on each fails once. (Reservations are safe to resend: proxy.store.redis.)
- A command cancelled mid-flight (the caller's timeout) drops its connection, whose next reply
  would otherwise answer the next command.
- Error replies come back as `ReplyError`; NOSCRIPT is left to the caller (it reloads).

URLs: redis://, rediss:// (TLS, verified with the system's CAs) and unix://, with user,
password and database. Anything redis-py would read from a query string is not understood
here: `supports` says no, and the store then sends everything through redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

__all__ = ["Connection", "Done", "ReplyError", "Slots", "Wire", "supports"]

# What a request's sender is called back with: (reply, None), or (None, the ConnectionError).
Done = Callable[[Any, "Exception | None"], None]


def pack(*args: str | int | float | bytes) -> bytes:
    """One command in RESP (hiredis.pack_command; its stub types the tuple as one element)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class ReplyError(Exception):
    """Redis answered with an error reply (`-ERR ...`, `-NOSCRIPT ...`)."""


def supports(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("redis", "rediss", "unix") and not parts.query


class Connection(asyncio.Protocol):
    """One connection with at most one request in flight. `send` takes a callback, called with
    (reply, None) or (None, ConnectionError) from the protocol's own callbacks: the store's hot
    path needs no Task and no future per round trip. `call` is the awaitable form."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.done: Done | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        try:
            reply = reader.gets()
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"redis protocol error: {exc}"))
            return
        if reply is False:
            return  # not all of it yet
        done, self.done = self.done, None
        if done is None or reader.gets() is not False:
            # A reply nobody asked for: this connection is out of step. Never reuse it.
            self._fail(ConnectionError("redis sent a reply nobody asked for"))
        if done is not None:
            done(reply, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(ConnectionError(f"redis closed the connection ({exc or 'EOF'})"))

    def _wake(self, error: Exception) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(None, error)

    def _fail(self, error: Exception) -> None:
        self._wake(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """Give up on the request in flight (its deadline passed): its reply may still come,
        and would answer the next request, so the connection is closed, its callback dropped."""
        self.done = None
        self.close()

    def send(self, payload: bytes, done: Done) -> None:
        assert self.transport is not None and self.done is None
        self.done = done
        self.transport.write(payload)

    async def call(self, payload: bytes) -> Any:
        waiter = asyncio.get_running_loop().create_future()
        self.send(payload, partial(_settle, waiter))
        try:
            return await waiter
        except BaseException:
            # Cancelled (a timeout) or failed mid-reply: its reply may still come.
            self.abandon()
            raise


def _settle(waiter: asyncio.Future[Any], reply: Any, error: Exception | None) -> None:
    if not waiter.done():
        if error is None:
            waiter.set_result(reply)
        else:
            waiter.set_exception(error)


class Wire:
    """Idle connections to one Redis, and `execute`: a command on one of them, retried once on
    a fresh connection if the connection fails. Callers bound how many run at once."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._path = unquote(parts.path) if parts.scheme == "unix" else None
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parts.path.lstrip("/") if self._path is None else ""
        self._db = int(db) if db else 0
        self._idle: list[Connection] = []

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        conn: Connection
        if self._path is not None:
            _, conn = await loop.create_unix_connection(Connection, self._path)
        else:
            # asyncio sets TCP_NODELAY on TCP transports.
            _, conn = await loop.create_connection(
                Connection, self._host, self._port, ssl=self._ssl
            )
        try:
            if self._password is not None:
                if self._username:
                    auth = pack("AUTH", self._username, self._password)
                else:
                    auth = pack("AUTH", self._password)
                _check(await conn.call(auth))
            if self._db:
                _check(await conn.call(pack("SELECT", self._db)))
        except BaseException:
            conn.close()
            raise
        return conn

    def keep(self, conn: Connection) -> None:
        """A connection for the idle list: opened by the warm-up, or done with its request."""
        if not conn.closed:
            self._idle.append(conn)

    def take(self) -> Connection | None:
        """An idle connection still open, if there is one."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def execute(self, payload: bytes, *, fresh: bool = False) -> Any:
        """A packed command's reply (`hiredis.pack_command`); an error reply raises ReplyError,
        a connection that fails twice raises ConnectionError (an OSError). `fresh`: the retry
        itself (an idle connection just failed): once, on a new connection."""
        idle = self._idle
        for attempt in (2,) if fresh else (1, 2):
            conn = None if fresh else self.take()
            if conn is None:
                conn = await self.connect()
            try:
                reply = await conn.call(payload)
            except ConnectionError:
                if attempt == 2:
                    raise
                continue
            idle.append(conn)
            if type(reply) is hiredis.ReplyError:
                raise ReplyError(str(reply))
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class Slots:
    """One slot per pooled connection, handed out first come first served to coroutines
    (`take`) and to callbacks (`wait`); taking a free one costs no Task, future or timer."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None] | Callable[[], None]] = deque()

    def try_take(self) -> bool:
        if self.free and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed over just as the wait was given up: pass it on
            else:
                self.cancel_wait(waiter)
            raise

    def wait(self, callback: Callable[[], None]) -> None:
        """`callback` is called (from `give`) once a slot is its own."""
        self._waiters.append(callback)

    def cancel_wait(self, waiter: asyncio.Future[None] | Callable[[], None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def give(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not isinstance(waiter, asyncio.Future):
                waiter()
                return
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


def _check(reply: Any) -> None:
    if type(reply) is hiredis.ReplyError:
        raise ReplyError(str(reply))
