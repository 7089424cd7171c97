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
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

__all__ = ["Connection", "ReplyError", "Wire", "supports"]


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
    """One connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiter: asyncio.Future[Any] | None = None
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
        waiter, self.waiter = self.waiter, None
        if waiter is None or reader.gets() is not False:
            # A reply nobody asked for: this connection is out of step. Never reuse it.
            self._fail(ConnectionError("redis sent a reply nobody asked for"))
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(ConnectionError(f"redis closed the connection ({exc or 'EOF'})"))

    def _wake(self, error: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _fail(self, error: Exception) -> None:
        self._wake(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def call(self, payload: bytes) -> Any:
        assert self.transport is not None and self.waiter is None
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        try:
            return await waiter
        except BaseException:
            # Cancelled (a timeout) or failed mid-reply: its reply may still come.
            self.close()
            raise


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
        """An opened connection for the idle list (the store's warm-up)."""
        if not conn.closed:
            self._idle.append(conn)

    async def execute(self, payload: bytes) -> Any:
        """A packed command's reply (`hiredis.pack_command`); an error reply raises ReplyError,
        a connection that fails twice raises ConnectionError (an OSError)."""
        idle = self._idle
        for attempt in (1, 2):
            conn = idle.pop() if idle else None
            if conn is None or conn.closed:
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


def _check(reply: Any) -> None:
    if type(reply) is hiredis.ReplyError:
        raise ReplyError(str(reply))
