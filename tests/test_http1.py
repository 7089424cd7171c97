"""proxy.http1, callgate's own HTTP/1.1 client, against real servers on 127.0.0.1.

Covered:
- body framing: Content-Length, chunked, close-delimited, 204 without a body;
- keep-alive: sequential requests share one connection; a response closed before its body
  completes is not reused; an idle connection the server closed is replaced without an error;
- the pool limit: concurrent requests never open more than `limit` connections; a cancelled
  waiter (also one woken and cancelled in the same tick) does not leak a slot;
- timeouts and failures: a stalled head or body raises a TimeoutError, a refused connection an
  OSError, a disconnect mid-body / a malformed status line / an undecodable or unsupported
  Content-Encoding an aiohttp.ClientPayloadError;
- streaming: SSE events arrive as separate chunks; a large body read slowly completes (the
  connection pauses above HIGH_WATER and resumes); gzip and deflate (zlib and raw) decode;
- interim 100 Continue answers; the request on the wire (Host, Content-Length, headers,
  CR/LF stripped from values); TLS with a trustme CA;
- proxy.upstream.Upstream end to end: fetch, and the 502 / 504 UpstreamErrors.

Two kinds of server: aiohttp's (the `aiohttp_server` fixture) for well-formed answers, and
`RawServer` (asyncio.start_server) where a test needs exact bytes, stalls, or connection counts.
Every test runs under `bounded()` (asyncio.wait_for), so none can hang.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import inspect
import json
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy import http1
from proxy.config import UpstreamConfig
from proxy.http1 import Origin, Pool
from proxy.upstream import Upstream, UpstreamError

LOCAL = "127.0.0.1"


def bounded(seconds: float = 10.0):
    """Run the (async) test under asyncio.wait_for: a hang fails the test instead."""

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            await asyncio.wait_for(fn(*args, **kwargs), seconds)

        return wrapper

    return deco


# -- raw servers ------------------------------------------------------------------------------


@dataclass
class RawRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes  # the request head exactly as received, through the blank line

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """One request (head, and a Content-Length body); None when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    request = RawRequest(method, target, headers, b"", head)  # type: ignore[arg-type]
    length = int(request.header("Content-Length") or 0)
    request.body = await reader.readexactly(length) if length else b""
    return request


def response(body: bytes = b"ok", status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    """An HTTP/1.1 response with a Content-Length."""
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A TCP server on 127.0.0.1 running `handle(reader, writer)` per connection; counts them."""

    handle: Handler
    accepted: int = 0
    open: int = 0
    max_open: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _server: asyncio.Server | None = None
    port: int = 0

    @property
    def origin(self) -> Origin:
        return Origin("http", LOCAL, self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, LOCAL, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def serve(
    server_box: list[RawServer],
    respond: Callable[[RawRequest], bytes | Awaitable[bytes]],
) -> Handler:
    """A keep-alive handler: each request read is recorded and answered with `respond(req)`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(1000):  # bounded: no test sends this many requests on one connection
            request = await read_request(reader)
            if request is None:
                return
            server_box[0].requests.append(request)
            out = respond(request)
            if inspect.isawaitable(out):
                out = await out
            writer.write(out)
            await writer.drain()

    return handle


async def until(predicate: Callable[[], bool], seconds: float = 2.0) -> None:
    """Wait (bounded) for `predicate()` to hold."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return sock.getsockname()[1]


@pytest.fixture
async def raw_server():
    servers: list[RawServer] = []

    async def start(
        respond: Callable[[RawRequest], bytes | Awaitable[bytes]] | None = None,
        *,
        handle: Handler | None = None,
    ) -> RawServer:
        box: list[RawServer] = []
        server = RawServer(handle or serve(box, respond or (lambda _req: response())))
        box.append(server)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool():
    pools: list[Pool] = []

    def make(limit: int = 10, read_timeout: float = 5.0, **kwargs: Any) -> Pool:
        kwargs.setdefault("connect_timeout", 2.0)
        pool = Pool(limit=limit, read_timeout=read_timeout, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def aiohttp_origin(aiohttp_server, app: web.Application, **kwargs: Any):
    server = await aiohttp_server(app, **kwargs)
    return server, Origin("https" if kwargs.get("ssl") else "http", LOCAL, server.port)


async def get(pool: Pool, origin: Origin, target: str = "/") -> http1.Response:
    return await pool.request(origin, "GET", target, (), None)


async def fetch(pool: Pool, origin: Origin, target: str = "/") -> tuple[int, bytes]:
    resp = await get(pool, origin, target)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


# -- 1. body framing --------------------------------------------------------------------------


@bounded()
async def test_content_length_body(aiohttp_server, make_pool):
    body = bytes(range(256)) * 40

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"X-Thing": "a"}, reason="Fine")

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app)
    pool = make_pool()
    resp = await get(pool, origin)
    assert (resp.status, resp.reason) == (200, "Fine")
    assert resp.headers["x-thing"] == "a"
    assert resp.headers["Content-Length"] == str(len(body))
    assert await resp.read() == body
    resp.release()


@bounded()
async def test_chunked_body(aiohttp_server, make_pool):
    parts = [b"first ", b"second " * 1000, b"third"]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app)
    resp = await get(make_pool(), origin)
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert await resp.read() == b"".join(parts)
    resp.release()


@bounded()
async def test_close_delimited_body(raw_server, make_pool):
    body = b"until the server closes " * 500

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(0, len(body), 4096):  # in pieces, so it is not one read
            writer.write(body[i : i + 4096])
            await writer.drain()
        writer.close()

    server = await raw_server(handle=handle)
    pool = make_pool()
    resp = await get(pool, server.origin)
    assert await resp.read() == body
    resp.release()
    # The connection is gone (its end was the body's end): the next request opens another.
    resp = await get(pool, server.origin)
    assert await resp.read() == body
    resp.release()
    assert server.accepted == 2


@bounded()
async def test_204_has_no_body_and_keeps_the_connection(raw_server, make_pool):
    server = await raw_server(
        lambda req: b"HTTP/1.1 204 No Content\r\n\r\n" if req.target == "/none" else response()
    )
    pool = make_pool()
    assert await fetch(pool, server.origin, "/none") == (204, b"")
    assert await fetch(pool, server.origin, "/") == (200, b"ok")
    assert server.accepted == 1


# -- 2. keep-alive ----------------------------------------------------------------------------


@bounded()
async def test_sequential_requests_reuse_one_connection(aiohttp_server, make_pool):
    peers: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text=f"answer {request.query['n']}")

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app)
    pool = make_pool()
    for n in range(5):
        assert await fetch(pool, origin, f"/?n={n}") == (200, f"answer {n}".encode())
    assert len(peers) == 5
    assert len(set(peers)) == 1
    assert len(pool.open) == 1


@bounded()
async def test_response_closed_mid_body_is_not_reused(raw_server, make_pool):
    def respond(req: RawRequest) -> bytes:
        if req.target == "/big":  # promises 1 MB, sends 10 bytes, keeps the connection open
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789"
        return response(req.target.encode())

    server = await raw_server(respond)
    pool = make_pool()
    resp = await get(pool, server.origin, "/big")
    assert resp.status == 200
    resp.close()  # body incomplete: this connection must not carry the next request
    assert await fetch(pool, server.origin, "/small") == (200, b"/small")
    assert server.accepted == 2
    assert [r.target for r in server.requests] == ["/big", "/small"]
    await until(lambda: server.open == 1)  # the first connection was closed


@bounded()
async def test_unread_but_complete_response_is_reused(raw_server, make_pool):
    server = await raw_server(lambda req: response(req.target.encode()))
    pool = make_pool()
    resp = await get(pool, server.origin, "/first")
    await until(lambda: resp._done)  # the body is in, not read
    resp.release()
    assert await fetch(pool, server.origin, "/second") == (200, b"/second")
    assert server.accepted == 1


@bounded()
async def test_connection_idle_too_long_is_not_reused(raw_server, make_pool, monkeypatch):
    monkeypatch.setattr(http1, "KEEPALIVE_SECONDS", 0.2)
    server = await raw_server(lambda req: response(req.target.encode()))
    pool = make_pool()
    assert await fetch(pool, server.origin, "/1") == (200, b"/1")
    assert await fetch(pool, server.origin, "/2") == (200, b"/2")
    assert server.accepted == 1  # reused while fresh
    await asyncio.sleep(0.3)
    assert await fetch(pool, server.origin, "/3") == (200, b"/3")
    assert server.accepted == 2  # too old: closed and replaced
    assert len(pool.open) == 1


@bounded()
async def test_idle_connection_closed_by_server_is_replaced(raw_server, make_pool):
    async def handle(reader, writer):  # answers one request (keep-alive), then hangs up
        request = await read_request(reader)
        assert request is not None
        writer.write(response(b"once"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await raw_server(handle=handle)
    pool = make_pool()
    assert await fetch(pool, server.origin) == (200, b"once")
    assert len(pool.idle[server.origin.key]) == 1
    await until(lambda: not pool.idle[server.origin.key])  # the close has been noticed
    assert await fetch(pool, server.origin) == (200, b"once")
    assert server.accepted == 2
    assert len(pool.open) == 1


# -- 4. the pool limit ------------------------------------------------------------------------


@bounded()
async def test_limit_bounds_concurrent_connections(raw_server, make_pool):
    async def slow(req: RawRequest) -> bytes:
        await asyncio.sleep(0.1)
        return response(req.target.encode())

    server = await raw_server(slow)
    pool = make_pool(limit=2)
    results = await asyncio.gather(*(fetch(pool, server.origin, f"/{n}") for n in range(5)))
    assert results == [(200, f"/{n}".encode()) for n in range(5)]
    assert server.max_open <= 2
    assert server.accepted == 2
    assert len(pool.open) <= 2
    assert not pool.waiters


@bounded()
async def test_cancelled_waiter_does_not_leak_a_slot(raw_server, make_pool):
    go = asyncio.Event()

    async def held(req: RawRequest) -> bytes:
        if req.target == "/held":
            await go.wait()
        return response(req.target.encode())

    server = await raw_server(held)
    pool = make_pool(limit=1)
    first = asyncio.create_task(get(pool, server.origin, "/held"))
    await until(lambda: len(server.requests) == 1)
    waiter = asyncio.create_task(fetch(pool, server.origin, "/cancelled"))
    await until(lambda: len(pool.waiters) == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not pool.waiters
    go.set()
    resp = await first
    assert await resp.read() == b"/held"
    resp.release()
    assert await fetch(pool, server.origin, "/after") == (200, b"/after")
    assert [r.target for r in server.requests] == ["/held", "/after"]
    assert server.accepted == 1


@bounded()
async def test_closing_the_pool_fails_requests_waiting_for_a_connection(raw_server, make_pool):
    go = asyncio.Event()

    async def held(req: RawRequest) -> bytes:
        await go.wait()
        return response(req.target.encode())

    server = await raw_server(held)
    pool = make_pool(limit=1)
    first = asyncio.create_task(get(pool, server.origin, "/held"))
    await until(lambda: len(server.requests) == 1)
    waiting = asyncio.create_task(fetch(pool, server.origin, "/waiting"))
    await until(lambda: len(pool.waiters) == 1)
    await pool.close()
    with pytest.raises(aiohttp.ClientConnectionError, match="shutting down"):
        await waiting
    go.set()
    with pytest.raises(aiohttp.ClientError):
        await (await first).read()


@bounded()
async def test_waiter_woken_and_cancelled_at_once_passes_its_turn_on(raw_server, make_pool):
    server = await raw_server(lambda req: response(req.target.encode()))
    pool = make_pool(limit=1)
    resp = await get(pool, server.origin, "/first")
    await until(lambda: resp._done)
    second = asyncio.create_task(fetch(pool, server.origin, "/second"))
    third = asyncio.create_task(fetch(pool, server.origin, "/third"))
    await until(lambda: len(pool.waiters) == 2)
    resp.release()  # wakes `second`...
    second.cancel()  # ...which is cancelled before it runs: `third` must get the connection
    assert await third == (200, b"/third")
    with pytest.raises(asyncio.CancelledError):
        await second
    assert not pool.waiters


# -- 5. timeouts and connection failures ------------------------------------------------------


async def stall_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes):
    """Read the request, write `data`, then say nothing more until the client hangs up."""
    await read_request(reader)
    writer.write(data)
    await writer.drain()
    await reader.read()  # EOF when the client closes


@bounded()
async def test_read_timeout_mid_body(raw_server, make_pool):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    server = await raw_server(handle=functools.partial(stall_after, data=head))
    pool = make_pool(read_timeout=0.2)
    resp = await get(pool, server.origin)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError) as info:
        await resp.read()
    assert isinstance(info.value, aiohttp.ServerTimeoutError)
    assert loop.time() - started < 1.0
    resp.release()
    await until(lambda: server.open == 0)  # the connection was closed


@bounded()
async def test_read_timeout_before_the_head(raw_server, make_pool):
    server = await raw_server(handle=functools.partial(stall_after, data=b""))
    pool = make_pool(read_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await get(pool, server.origin)
    assert 0.15 < loop.time() - started < 1.0
    assert not pool.open
    await until(lambda: server.open == 0)


@bounded()
async def test_a_trickling_body_does_not_time_out(raw_server, make_pool):
    async def trickle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
        for byte in b"12345678":  # 0.8 s in all, each gap well under read_timeout
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()
        await reader.read()

    server = await raw_server(handle=trickle)
    pool = make_pool(read_timeout=0.3)
    resp = await get(pool, server.origin)
    assert await resp.read() == b"12345678"
    resp.release()


@bounded()
async def test_connect_refused_raises_oserror(make_pool):
    pool = make_pool()
    with pytest.raises(OSError):
        await get(pool, Origin("http", LOCAL, closed_port()))
    assert not pool.open


# -- 6. disconnects, malformed answers, streaming ---------------------------------------------


@bounded()
async def test_disconnect_mid_body_raises_payload_error(raw_server, make_pool):
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    server = await raw_server(handle=handle)
    resp = await get(make_pool(), server.origin)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    resp.release()


@bounded()
async def test_disconnect_before_the_head_raises_server_disconnected(raw_server, make_pool):
    async def handle(reader, writer):
        await read_request(reader)
        writer.close()

    server = await raw_server(handle=handle)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await get(make_pool(), server.origin)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    ],
    ids=["status", "garbage", "content-length"],
)
@bounded()
async def test_malformed_answer_raises_payload_error(raw_server, make_pool, answer):
    server = await raw_server(handle=functools.partial(stall_after, data=answer))
    pool = make_pool()
    with pytest.raises(aiohttp.ClientPayloadError, match="malformed"):
        await get(pool, server.origin)
    assert not pool.open


@bounded()
async def test_sse_events_arrive_as_separate_chunks(aiohttp_server, make_pool):
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    received = [asyncio.Event() for _ in events]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event, seen in zip(events, received, strict=True):
            await resp.write(event)
            await asyncio.wait_for(seen.wait(), 5)  # the client has it before the next is sent
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app)
    resp = await get(make_pool(), origin)
    assert resp.headers["Content-Type"] == "text/event-stream"
    chunks = []
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        received[len(chunks) - 1].set()
    resp.release()
    assert chunks == events


# -- 7. Content-Encoding ----------------------------------------------------------------------

PLAIN = json.dumps({"choices": [{"message": {"content": "x" * 5000}}]}).encode()


def raw_deflate(data: bytes) -> bytes:
    comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return comp.compress(data) + comp.flush()


ENCODED = {
    "gzip": ("gzip", gzip.compress(PLAIN)),
    "x-gzip": ("x-gzip", gzip.compress(PLAIN)),
    "deflate-zlib": ("deflate", zlib.compress(PLAIN)),
    "deflate-raw": ("deflate", raw_deflate(PLAIN)),
}


def encoded_app(encoding: str, body: bytes, pieces: int) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        if pieces == 1:
            return web.Response(body=body, headers={"Content-Encoding": encoding})
        resp = web.StreamResponse(headers={"Content-Encoding": encoding})
        await resp.prepare(request)
        step = len(body) // pieces + 1
        for i in range(0, len(body), step):
            await resp.write(body[i : i + step])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    return app


@pytest.mark.parametrize("pieces", [1, 5], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", list(ENCODED))
@bounded()
async def test_encoded_body_decodes(aiohttp_server, make_pool, name, pieces):
    encoding, body = ENCODED[name]
    _, origin = await aiohttp_origin(aiohttp_server, encoded_app(encoding, body, pieces))
    resp = await get(make_pool(), origin)
    assert resp.headers["Content-Encoding"] == encoding
    assert await resp.read() == PLAIN
    resp.release()


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(PLAIN)[:10] + b"\x00garbage" * 20],
    ids=["not-gzip", "corrupt-stream"],
)
@bounded()
async def test_corrupt_gzip_raises_payload_error(aiohttp_server, make_pool, body):
    _, origin = await aiohttp_origin(aiohttp_server, encoded_app("gzip", body, 1))
    resp = await get(make_pool(), origin)
    with pytest.raises(aiohttp.ClientPayloadError, match="does not decode"):
        await resp.read()
    resp.release()


@bounded()
async def test_gzip_with_a_bad_checksum_raises_payload_error(aiohttp_server, make_pool):
    good = gzip.compress(PLAIN)
    bad = good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:]  # CRC32 flipped
    _, origin = await aiohttp_origin(aiohttp_server, encoded_app("gzip", bad, 1))
    resp = await get(make_pool(), origin)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    resp.release()


async def test_truncated_gzip_raises_payload_error(aiohttp_server, make_pool):
    truncated = gzip.compress(PLAIN)[:-20]  # valid as far as it goes, but it stops early
    _, origin = await aiohttp_origin(aiohttp_server, encoded_app("gzip", truncated, 1))
    resp = await get(make_pool(), origin)
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            body = await resp.read()
            assert len(body) < len(PLAIN)  # what happens now: a silently short body
    finally:
        resp.release()


async def test_raw_deflate_split_after_one_byte_decodes(raw_server, make_pool):
    body = raw_deflate(PLAIN)
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: {len(body)}\r\n\r\n"

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(head.encode() + body[:1])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(body[1:])
        await writer.drain()
        await reader.read()

    server = await raw_server(handle=handle)
    resp = await get(make_pool(), server.origin)
    try:
        assert await resp.read() == PLAIN
    finally:
        resp.release()


@bounded()
async def test_unsupported_encoding_raises_payload_error(raw_server, make_pool):
    def respond(req: RawRequest) -> bytes:
        if req.target == "/br":
            return response(b"\x8b\x02\x80brotli", headers=("Content-Encoding: br",))
        return response(req.target.encode())

    server = await raw_server(respond)
    pool = make_pool()
    resp = await get(pool, server.origin, "/br")
    assert resp.headers["Content-Encoding"] == "br"
    with pytest.raises(aiohttp.ClientPayloadError, match="unsupported encoding 'br'"):
        await resp.read()
    resp.release()
    # Streamed, none of the undecodable bytes reach the consumer before the error.
    resp = await get(pool, server.origin, "/br")
    pieces = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in resp.content.iter_any():
            pieces.append(piece)
    assert pieces == []
    resp.release()
    assert await fetch(pool, server.origin, "/next") == (200, b"/next")
    assert server.accepted == 3  # the failed responses' connections were not reused


# -- 8. interim answers -----------------------------------------------------------------------


@pytest.mark.parametrize("pause", [False, True], ids=["one-write", "separate-writes"])
@bounded()
async def test_100_continue_then_the_real_answer(raw_server, make_pool, pause):
    async def respond(req: RawRequest) -> bytes:
        if req.target == "/continue":
            return b"HTTP/1.1 100 Continue\r\n\r\n" + (b"" if pause else response(b"final"))
        return response(req.target.encode())

    async def handle(reader, writer):
        for _ in range(10):
            req = await read_request(reader)
            if req is None:
                return
            writer.write(await respond(req))
            await writer.drain()
            if pause and req.target == "/continue":
                await asyncio.sleep(0.05)
                writer.write(response(b"final"))
                await writer.drain()

    server = await raw_server(handle=handle)
    pool = make_pool()
    resp = await pool.request(server.origin, "POST", "/continue", (), b"{}")
    assert (resp.status, resp.reason) == (200, "OK")
    assert resp.headers["Content-Length"] == "5"
    assert await resp.read() == b"final"
    resp.release()
    assert await fetch(pool, server.origin, "/next") == (200, b"/next")
    assert server.accepted == 1


# -- 9. the request on the wire ---------------------------------------------------------------


@bounded()
async def test_post_request_on_the_wire(raw_server, make_pool):
    server = await raw_server()
    body = b'{"model": "m", "messages": []}'
    headers = [("Content-Type", "application/json"), ("X-Multi", "1"), ("X-Multi", "2")]
    resp = await make_pool().request(server.origin, "POST", "/v1/chat?x=%2F", headers, body)
    assert await resp.read() == b"ok"
    resp.release()
    [req] = server.requests
    assert (req.method, req.target) == ("POST", "/v1/chat?x=%2F")
    assert req.head.startswith(b"POST /v1/chat?x=%2F HTTP/1.1\r\n")
    assert [h for h in req.headers if h[0].lower() == "host"] == [
        ("Host", f"{LOCAL}:{server.port}")
    ]
    assert req.header("Content-Length") == str(len(body))
    assert req.header("Content-Type") == "application/json"
    assert [v for k, v in req.headers if k == "X-Multi"] == ["1", "2"]
    assert req.body == body
    assert req.head.count(b"HTTP/1.1") == 1


@bounded()
async def test_content_length_only_when_there_is_a_body_or_a_post(raw_server, make_pool):
    server = await raw_server()
    pool = make_pool()
    for method, body in [("GET", None), ("POST", None), ("DELETE", b"x")]:
        resp = await pool.request(server.origin, method, "/", (), body)
        await resp.read()
        resp.release()
    get_req, post_req, delete_req = server.requests
    assert get_req.header("Content-Length") is None
    assert post_req.header("Content-Length") == "0"
    assert (delete_req.header("Content-Length"), delete_req.body) == ("1", b"x")


@bounded()
async def test_crlf_in_a_header_value_cannot_split_the_head(raw_server, make_pool):
    server = await raw_server()
    headers = [("X-Key", "abc\r\nX-Injected: 1\r\n\r\nGET /smuggled HTTP/1.1"), ("X-After", "y")]
    resp = await make_pool().request(server.origin, "GET", "/", headers, None)
    assert await resp.read() == b"ok"
    resp.release()
    await asyncio.sleep(0.05)  # a smuggled second request would have arrived by now
    [req] = server.requests
    assert req.header("X-Key") == "abcX-Injected: 1GET /smuggled HTTP/1.1"
    assert req.header("X-Injected") is None
    assert req.header("X-After") == "y"


async def test_non_latin1_header_value_goes_out_as_utf8(raw_server, make_pool):
    server = await raw_server()
    resp = await make_pool().request(server.origin, "GET", "/", [("X-Title", "café 日本")], None)
    assert await resp.read() == b"ok"
    resp.release()
    [req] = server.requests
    assert "X-Title: café 日本".encode() in req.head


def test_origin_host_header():
    assert Origin("http", "example.com", None).host_header == "example.com"
    assert Origin("http", "example.com", 80).host_header == "example.com"
    assert Origin("https", "example.com", None).port == 443
    assert Origin("https", "example.com", 443).host_header == "example.com"
    assert Origin("https", "example.com", 80).host_header == "example.com:80"
    assert Origin("http", "::1", 8080).host_header == "[::1]:8080"
    with pytest.raises(ValueError, match="scheme"):
        Origin("ftp", "example.com", None)


# -- 10. flow control -------------------------------------------------------------------------


BIG = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB, not compressible


@bounded(30)
async def test_large_body_read_slowly_pauses_and_completes(aiohttp_server, make_pool):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=BIG)

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app)
    pool = make_pool(read_timeout=10)
    resp = await get(pool, origin)
    conn = resp._conn
    sizes = []
    digest = hashlib.sha256()
    saw_pause = False
    async for chunk in resp.content.iter_any():
        sizes.append(len(chunk))
        digest.update(chunk)
        await asyncio.sleep(0.02)  # a slow consumer: the server could fill memory meanwhile
        saw_pause = saw_pause or (conn is not None and conn.paused)
    resp.release()
    assert sum(sizes) == len(BIG)
    assert digest.digest() == hashlib.sha256(BIG).digest()
    assert saw_pause
    # Never much more than HIGH_WATER buffered (one socket read can overshoot it).
    assert max(sizes) <= 2 * http1.HIGH_WATER
    assert len(pool.open) == 1  # the connection, resumed and complete, went back to the pool
    assert await fetch(pool, origin) == (200, BIG)


async def test_slow_consumer_of_a_paused_connection_does_not_time_out(aiohttp_server, make_pool):
    body = BIG[: 3 * 1024 * 1024]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app)
    resp = await get(make_pool(read_timeout=0.2), origin)
    total = 0
    try:
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            await asyncio.sleep(0.5)  # slower than read_timeout; the server is not stalled
    finally:
        resp.release()
    assert total == len(body)


# -- 11. TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_origin(aiohttp_server, tls_ca):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert(LOCAL).configure_cert(server_ctx)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"secure {request.secure}")

    app = web.Application()
    app.router.add_get("/", handler)
    _, origin = await aiohttp_origin(aiohttp_server, app, ssl=server_ctx)
    return origin


@bounded()
async def test_tls_with_a_trusted_ca(tls_origin, tls_ca, make_pool):
    client_ctx = ssl.create_default_context()
    tls_ca.configure_trust(client_ctx)
    pool = make_pool(ssl_context=client_ctx)
    assert tls_origin.tls
    assert await fetch(pool, tls_origin) == (200, b"secure True")
    assert await fetch(pool, tls_origin) == (200, b"secure True")
    assert len(pool.open) == 1


@bounded()
async def test_tls_with_an_untrusted_certificate_fails(tls_origin, make_pool):
    pool = make_pool()  # the default context: system CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(pool, tls_origin)
    assert not pool.open


# -- 12. proxy.upstream.Upstream end to end ---------------------------------------------------


@pytest.fixture
async def make_upstream():
    upstreams: list[Upstream] = []

    async def make(base_url: str, **kwargs: Any) -> Upstream:
        up = Upstream(UpstreamConfig(base_url=base_url, **kwargs))
        await up.start()
        upstreams.append(up)
        return up

    yield make
    for up in upstreams:
        await up.close()


@bounded()
async def test_upstream_fetch(aiohttp_server, make_upstream):
    seen: list[tuple[str, dict[str, str], Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.path_qs, dict(request.headers), await request.json()))
        body = gzip.compress(json.dumps({"id": "chatcmpl-1", "object": "chat.completion"}).encode())
        return web.Response(
            body=body,
            content_type="application/json",
            headers={"Content-Encoding": "gzip", "x-request-id": "req_1"},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    up = await make_upstream(f"http://{LOCAL}:{server.port}/v1", api_key="sk-test")
    reply = await up.fetch(
        "POST",
        "/chat/completions",
        {
            "Content-Type": "application/json",
            "Authorization": "Bearer client-key",
            "Host": "callgate.example",
            "X-Callgate-Principal": "alice",
            "Accept-Encoding": "br",
        },
        b'{"model": "m"}',
    )
    assert reply.status == 200
    assert json.loads(reply.body) == {"id": "chatcmpl-1", "object": "chat.completion"}
    assert reply.headers["x-request-id"] == "req_1"
    [(path, headers, body)] = seen
    assert path == "/v1/chat/completions"
    assert body == {"model": "m"}
    assert headers["Authorization"] == "Bearer sk-test"
    assert headers["Host"] == f"{LOCAL}:{server.port}"
    assert headers["Accept-Encoding"] == "gzip, deflate"
    assert "X-Callgate-Principal" not in headers


@bounded()
async def test_upstream_unreachable_is_502(make_upstream):
    up = await make_upstream(f"http://{LOCAL}:{closed_port()}/v1")
    with pytest.raises(UpstreamError) as info:
        await up.fetch("POST", "/chat/completions", {}, b"{}")
    assert (info.value.status, info.value.code) == (502, "upstream_unreachable")
    assert str(info.value).startswith("upstream unreachable:")


@bounded()
async def test_upstream_stalled_before_answering_is_504(raw_server, make_upstream):
    server = await raw_server(handle=functools.partial(stall_after, data=b""))
    up = await make_upstream(f"http://{LOCAL}:{server.port}/v1", timeout=0.2)
    with pytest.raises(UpstreamError) as info:
        await up.fetch("POST", "/chat/completions", {}, b"{}")
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert str(info.value) == "upstream timed out before answering"


@bounded()
async def test_upstream_stalled_mid_body_is_504(raw_server, make_upstream):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"
    server = await raw_server(handle=functools.partial(stall_after, data=head))
    up = await make_upstream(f"http://{LOCAL}:{server.port}/v1", timeout=0.2)
    with pytest.raises(UpstreamError) as info:
        await up.fetch("POST", "/chat/completions", {}, b"{}")
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert str(info.value) == "upstream timed out mid-response"


@bounded()
async def test_upstream_disconnected_mid_body_is_502(raw_server, make_upstream):
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        writer.close()

    server = await raw_server(handle=handle)
    up = await make_upstream(f"http://{LOCAL}:{server.port}/v1")
    with pytest.raises(UpstreamError) as info:
        await up.fetch("POST", "/chat/completions", {}, b"{}")
    assert info.value.status == 502
    assert str(info.value).startswith("upstream disconnected mid-response:")
