"""A small HTTP/1.1 client for the gated routes: keep-alive connections, one write per request.

Why not aiohttp's client here: on the gated routes a request is a JSON body already in memory
and the answer is JSON or an event stream, and aiohttp's general-purpose client (request and
response objects, payload writers, cookie and redirect handling, a timer per read) cost about
as much CPU per request as everything else callgate does. This client parses with llhttp
(`httptools`, the parser uvicorn uses), writes the request head and body in one `write`, and
checks the read timeout with one timer per response rather than per read. The pass-through
routes, which stream arbitrary bodies both ways, keep aiohttp's client.

Bounds against a hostile or broken upstream (`upstream.max_*`): an answer's decoded size, how
far its compressed bytes inflate (zlib's `max_length`: a bomb is cut off before it is
inflated, not after), and its whole duration. Each fails the response with `BoundExceeded`
or `DeadlinePassed`, which the routes turn into a 502 / 504 or an error event. Those, the
limits, the decoder, `Origin` and a request's encoding are in `proxy.http1_base`.

The response object offers the part of `aiohttp.ClientResponse` the routes use (`status`,
`reason`, `headers`, `content.iter_any()`, `read()`, `release()`, `close()`), and failures are
raised as aiohttp's exception types, so the routes handle both clients the same way.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import Sequence

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http1_base import (
    DECODE_SLICE,
    DEFAULT_LIMITS,
    RATIO_FLOOR,
    BoundExceeded,
    Chunks,
    DeadlinePassed,
    Decoder,
    Limits,
    Origin,
    encode_request,
)

# Re-exported: the routes and the upstream client name them `http1.X`.
__all__ = [
    "DEFAULT_LIMITS",
    "HIGH_WATER",
    "KEEPALIVE_SECONDS",
    "BoundExceeded",
    "Connection",
    "DeadlinePassed",
    "Decoder",
    "Limits",
    "Origin",
    "Pool",
    "Response",
]

# Buffered body bytes above which the connection stops reading until the consumer catches up.
HIGH_WATER = 1 << 20
KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is closed, not reused


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Response:
    """An upstream response whose body arrives in the background (see the module docstring)."""

    def __init__(self, conn: Connection, limits: Limits = DEFAULT_LIMITS) -> None:
        self._conn: Connection | None = conn
        self._limits = limits
        self._decoded = 0  # body bytes so far, after decoding
        self._wire = 0  # body bytes so far, as received (when there is a Content-Encoding)
        self._loop = conn.loop
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False  # the whole body has arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: Decoder | None = None

    @property
    def content(self) -> Response:
        return self  # `resp.content.iter_any()`, as with aiohttp

    # -- fed by the connection ------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._error is not None:
            return  # e.g. an encoding callgate cannot decode: none of it goes on
        if self._decoder is not None:
            if len(data) <= DECODE_SLICE:
                data = self._decode(data)
            else:
                view, step = memoryview(data), DECODE_SLICE
                pieces = [self._decode(view[i : i + step]) for i in range(0, len(view), step)]
                data = b"".join(pieces)
            if not data:
                return
        else:
            if len(data) > self._limits.max_bytes - self._decoded:
                raise self._exceeded("max_response_bytes")
            self._decoded += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _decode(self, data: bytes | memoryview) -> bytes:
        """Decode compressed body bytes within the bounds (raising BoundExceeded past one)."""
        assert self._decoder is not None
        limits = self._limits
        self._wire += len(data)
        room = limits.max_bytes - self._decoded
        bound = "max_response_bytes"
        by_ratio = max(RATIO_FLOOR, int(limits.max_ratio * self._wire)) - self._decoded
        if by_ratio < room:
            room, bound = by_ratio, "max_decompression_ratio"
        try:
            out = self._decoder.feed(data, room)
        except zlib.error as exc:
            raise aiohttp.ClientPayloadError(f"upstream body does not decode: {exc}") from None
        if len(out) > room:
            raise self._exceeded(bound)
        self._decoded += len(out)
        return out

    def _finish(self) -> None:
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except zlib.error as exc:
                self._fail(aiohttp.ClientPayloadError(f"upstream body does not decode: {exc}"))
                return
            if tail:
                if len(tail) > self._limits.max_bytes - self._decoded:
                    self._fail(self._exceeded("max_response_bytes"))
                    return
                self._decoded += len(tail)
                self._chunks.append(tail)
        self._done = True
        self._wake()

    def _exceeded(self, bound: str) -> BoundExceeded:
        """The error for a passed size bound (raised by the caller: the connection closes)."""
        limits = self._limits
        limits.exceeded(bound)
        if bound == "max_decompression_ratio":
            message = (
                f"upstream answer inflates more than upstream.max_decompression_ratio allows "
                f"({limits.max_ratio:g}x: {self._wire} compressed bytes decode past "
                f"{self._decoded} bytes)"
            )
        else:
            message = (
                f"upstream answer is larger than upstream.max_response_bytes "
                f"({limits.max_bytes} bytes decoded)"
            )
        return BoundExceeded(message, bound)

    def _fail(self, exc: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the route ----------------------------------------------------------------

    async def next_chunk(self) -> bytes | None:
        """What has arrived of the body since the last call (waiting for something if nothing
        has), None at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    @property
    def at_end(self) -> bool:
        """Nothing more will come: the whole body has arrived and been read."""
        return self._done and not self._chunks and self._error is None

    def iter_any(self) -> Chunks:
        return Chunks(self)

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            data = await self.next_chunk()
            if data is None:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            parts.append(data)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the whole body
        arrived (read or not), and is closed otherwise (which stops the upstream sending)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done_with(self, reusable=self._done and self._error is None)

    def close(self) -> None:
        """As aiohttp's close(): also keeps a connection whose body is complete."""
        self.release()  # (not `close = release`, which mypyc miscompiles: tests/test_native.py)


class Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one request at a time."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python < 3.12.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head: asyncio.Future[Response] | None = None
        self.closed = False
        self.keep_alive = False
        self.until_close = False  # body length is "until the server closes"
        self.active = False  # bytes arrived since the read-timeout timer last looked
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0  # loop time by which the whole answer must be in
        self.max_duration = 0.0
        self.paused = False
        self.idle_since = 0.0
        self._headers: list[tuple[str, str]] = []
        self._reason = b""
        # Body pieces the parser found in the read being parsed: fed to the response once per
        # read (a stream's read often holds a dozen events, each a chunk of its own).
        self._body: list[bytes] = []

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.active = True
        try:
            self.parser.feed_data(data)
            if self._body:
                self._feed_body()
        except aiohttp.ClientError as exc:  # a size bound passed (or undecodable) in _feed_body
            self._abort(exc)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__  # what the callback raised (e.g. an undecodable body)
            if not isinstance(cause, aiohttp.ClientError):
                cause = aiohttp.ClientPayloadError(f"malformed HTTP response: {cause or exc}")
            self._abort(cause)
        except httptools.HttpParserError as exc:
            self._abort(aiohttp.ClientPayloadError(f"malformed HTTP response: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        response = self.response
        if self.head is not None and not self.head.done():
            self.head.set_exception(
                aiohttp.ServerDisconnectedError("upstream closed the connection before answering")
            )
        elif response is not None and not response._done:
            if self.until_close and exc is None:
                response._finish()
            else:
                response._fail(
                    aiohttp.ClientPayloadError("upstream closed the connection mid-body")
                )
        self.pool.forget(self)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        response = self.response
        if response is None or self.head is None:
            raise RuntimeError("upstream sent a response nobody asked for")
        headers = CIMultiDict(self._headers)
        response.status = status
        response.reason = self._reason.decode("latin-1")
        response.headers = CIMultiDictProxy(headers)
        self.keep_alive = self.parser.should_keep_alive()
        self.until_close = (
            "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        )
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            response._decoder = Decoder(encoding)
        elif encoding not in ("", "identity"):
            response._fail(
                aiohttp.ClientPayloadError(f"upstream sent an unsupported encoding {encoding!r}")
            )
        self.head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self._body.append(body)

    def _feed_body(self) -> None:
        body, self._body = self._body, []
        if self.response is not None:
            self.response._feed(body[0] if len(body) == 1 else b"".join(body))

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            return
        self._stop_timer()
        if self._body:
            self._feed_body()
        if self.response is not None:
            self.response._finish()

    # -- used by Pool and Response ----------------------------------------------------------

    def send(
        self, data: bytes, response: Response, read_timeout: float
    ) -> asyncio.Future[Response]:
        loop = self.loop
        self.response = response
        self.head = loop.create_future()
        self.keep_alive = False
        self.until_close = False
        self.active = False
        # One timer serves both the silence timeout and the overall deadline: it fires every
        # `read_timeout`, or at the deadline when that comes first.
        now = loop.time()
        self.max_duration = response._limits.max_duration
        self.deadline = now + self.max_duration
        self._arm(now, read_timeout)
        assert self.transport is not None
        self.transport.write(data)
        return self.head

    def _arm(self, now: float, read_timeout: float) -> None:
        at = now + read_timeout
        final = at >= self.deadline
        self.timer = self.loop.call_at(
            self.deadline if final else at, self._check_timeout, read_timeout, final
        )

    def _check_timeout(self, read_timeout: float, final: bool) -> None:
        if final:
            # Data arriving (keep-alive comments, a slow drip) does not move the deadline.
            self.timer = None
            if self.response is not None:
                self.response._limits.exceeded("max_duration")
            self._abort(
                DeadlinePassed(
                    f"upstream answer not complete within upstream.max_duration "
                    f"({self.max_duration:g} s)"
                )
            )
            return
        if self.active or self.paused:
            # Paused, nothing can arrive: the consumer is slow, not the upstream.
            self.active = False
            self._arm(self.loop.time(), read_timeout)
            return
        self.timer = None
        self._abort(aiohttp.ServerTimeoutError(f"no data from the upstream for {read_timeout:g} s"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _abort(self, exc: BaseException) -> None:
        """The connection cannot go on: whoever waits on it gets `exc`."""
        self._stop_timer()
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        elif self.response is not None:
            self.response._fail(exc)
        self.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def done_with(self, response: Response, reusable: bool) -> None:
        if self.response is not response:
            return
        self.response = None
        self.head = None
        self._stop_timer()
        self.resume()
        if reusable and self.keep_alive and not self.closed:
            self.pool.put_back(self)
        else:
            self.close()
            self.pool.forget(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class Pool:
    """Keep-alive connections per origin, at most `limit` open at once (others wait)."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.limits = limits
        self.ssl_context = ssl_context
        self.idle: dict[tuple[str, str, int], list[Connection]] = {}
        self.open: set[Connection] = set()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closing = False

    def _ssl(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
    ) -> Response:
        """Send a request; returns once the response's head is in (the body follows)."""
        data = encode_request(origin, method, target, headers, body)
        conn = await self._acquire(origin)
        response = Response(conn, self.limits)
        try:
            return await conn.send(data, response, self.read_timeout)
        except BaseException:
            response.close()  # cancelled or failed before the head: the connection goes
            raise

    async def _acquire(self, origin: Origin) -> Connection:
        while True:
            conn = self._idle(origin)
            if conn is not None:
                return conn
            if len(self.open) < self.limit or self._evict_idle():
                return await self._connect(origin)
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake_one()  # woken and cancelled at once: pass the turn on
                raise

    def _idle(self, origin: Origin) -> Connection | None:
        """A kept-alive connection to `origin` that is still good, if there is one."""
        idle = self.idle.get(origin.key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if (
                not conn.closed
                and now - conn.idle_since < KEEPALIVE_SECONDS
                and conn.transport is not None
                and not conn.transport.is_closing()  # the server's close is on its way in
            ):
                return conn
            conn.close()
            self.open.discard(conn)
        return None

    def _evict_idle(self) -> bool:
        """At the limit: close an idle connection (to another origin) to make room."""
        for idle in self.idle.values():
            if idle:
                conn = idle.pop(0)
                conn.close()
                self.open.discard(conn)
                return True
        return False

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(self, origin)
        self.open.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=self._ssl() if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
        except BaseException:
            self.forget(conn)
            raise
        return conn

    def put_back(self, conn: Connection) -> None:
        if self.closing:
            conn.close()
            self.forget(conn)
            return
        conn.idle_since = time.monotonic()
        self.idle.setdefault(conn.origin.key, []).append(conn)
        self._wake_one()

    def forget(self, conn: Connection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            idle = self.idle.get(conn.origin.key)
            if idle and conn in idle:
                idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self.closing = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("callgate is shutting down"))
        for conn in list(self.open):
            conn.close()
        self.open.clear()
        self.idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
