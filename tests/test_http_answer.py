"""proxy.http_answer: a whole response in one write, byte for byte what aiohttp would send.

The reference is aiohttp's own path: the same app, served by the same protocol with the fast
path switched off, answers the same raw requests; the two byte streams must be equal (Date
aside). Then what the fast path must keep: keep-alive and pipelining, `Connection: close`,
a header with CR/LF refused, and the cases it leaves to aiohttp.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy import http_answer, stream_response
from proxy.config import ServerConfig
from proxy.server import make_runner
from proxy.stream_response import EventStream
from tests.native_pass import spies_on_internals

_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


async def _json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b'{"ok":true}', content_type="application/json")


async def _upstream_like(request: web.Request) -> web.StreamResponse:
    # As forward.raw_reply: the upstream's headers, repeated ones included, and its status.
    headers = {"x-request-id": "req_1", "openai-processing-ms": "12"}
    resp = web.Response(status=201, headers=headers, body=b"x" * 70000)
    resp.headers.add("Set-Thing", "a")
    resp.headers.add("Set-Thing", "b")
    return resp


async def _error_close(request: web.Request) -> web.StreamResponse:
    resp = web.Response(status=400, reason="Bad Request", text='{"error":{}}')
    resp.force_close()
    return resp


async def _empty(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def _no_type(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"raw bytes")


async def _no_content(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def _text(request: web.Request) -> web.StreamResponse:
    return web.Response(text="héllo", headers={"Server": "someone-else"})


async def _echo(request: web.Request) -> web.StreamResponse:
    return web.Response(body=await request.read())


async def _bad_header(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"{}", headers={"x-evil": "a\r\nInjected: yes"})


async def _stream(request: web.Request) -> web.StreamResponse:
    # As forward.serve_stream: the upstream's headers, then reads of events, the last one
    # with the end; `?slow` waits past HEADERS_AFTER first, so the headers go out alone.
    out = EventStream(status=200, headers={"Content-Type": "text/event-stream"})
    out.headers["x-callgate-request-id"] = "cg-1"
    await out.prepare(request)
    if "slow" in request.query:
        await asyncio.sleep(stream_response.HEADERS_AFTER * 3)
    await out.write(b"data: one\n\n")
    await out.write(b"")
    await out.write(b"data: two\n\n" * 3)
    await out.write_eof(b"data: [DONE]\n\n" if "tail" in request.query else b"")
    await out.write_eof(b"ignored")  # a second end is a no-op, as aiohttp's
    return out


async def _stream_left_open(request: web.Request) -> web.StreamResponse:
    # A handler that never ends its stream: aiohttp's finish_response ends it.
    out = EventStream(status=200, headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b"data: x\n\n")
    return out


async def _stream_then_raise(request: web.Request) -> web.StreamResponse:
    out = EventStream(status=200, headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b"data: one\n\n")
    raise RuntimeError("escapes every middleware after the stream started")


async def _stream_replaced(request: web.Request) -> web.StreamResponse:
    out = EventStream(status=200, headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    return web.Response(status=503, body=b"err")  # another answer instead of the stream


BIG = 4 << 20  # past every socket buffer: the writer must wait for a slow reader


async def _big(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"z" * BIG)


async def _big_stream(request: web.Request) -> web.StreamResponse:
    out = EventStream(status=200, headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for _ in range(BIG // 65536):
        await out.write(b"z" * 65536)
    await out.write_eof()
    return out


def _app() -> web.Application:
    app = web.Application()
    for path, handler in (
        ("/json", _json),
        ("/upstream", _upstream_like),
        ("/error", _error_close),
        ("/empty", _empty),
        ("/no-type", _no_type),
        ("/no-content", _no_content),
        ("/text", _text),
        ("/bad-header", _bad_header),
    ):
        app.router.add_get(path, handler)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/stream-open", _stream_left_open)
    app.router.add_get("/stream-raise", _stream_then_raise)
    app.router.add_get("/big", _big)
    app.router.add_get("/big-stream", _big_stream)
    app.router.add_get("/stream-replaced", _stream_replaced)
    return app


@pytest.fixture
async def server() -> AsyncIterator[int]:
    runner = make_runner(_app(), ServerConfig())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port
    await runner.cleanup()


async def _exchange(port: int, data: bytes, until_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        if until_close:
            out = await asyncio.wait_for(reader.read(-1), 5)
        else:
            # Read until every answer asked for has its whole body.
            while True:
                chunk = await asyncio.wait_for(reader.read(1 << 16), 5)
                if not chunk:
                    break
                out += chunk
                if _complete(out, data.count(b"HTTP/1.1\r\n")):
                    break
    finally:
        writer.close()
    return out


def _complete(data: bytes, answers: int) -> bool:
    at = 0
    for _ in range(answers):
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            return False
        length = re.search(rb"Content-Length: (\d+)", data[at:end])
        at = end + 4 + (int(length.group(1)) if length else 0)
        if at > len(data):
            return False
    return True


def _get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


CASES = [
    _get("/json"),
    _get("/upstream"),
    _get("/empty"),
    _get("/no-type"),
    _get("/no-content"),
    _get("/text"),
    _get("/json", "Connection: close"),
    b"GET /json HTTP/1.0\r\nHost: x\r\n\r\n",
    b"HEAD /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    _get("/missing"),
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    # Pipelined: three answers on one connection, in order.
    _get("/json") + _get("/upstream") + _get("/empty"),
    _get("/stream", "Connection: close"),
    _get("/stream?tail", "Connection: close"),
    _get("/stream?slow&tail", "Connection: close"),
    _get("/stream-open", "Connection: close"),
    b"GET /stream?tail HTTP/1.0\r\nHost: x\r\n\r\n",
    _get("/stream?tail") + _get("/json", "Connection: close"),
]


@pytest.mark.parametrize("raw", CASES, ids=lambda raw: raw.split(b"\r\n")[0].decode()[:40])
async def test_same_bytes_as_aiohttp(
    server: int, raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    closes = b"Connection: close" in raw or b"HTTP/1.0" in raw
    fast = await _exchange(server, raw, until_close=closes)
    with monkeypatch.context() as m:
        m.setattr(http_answer, "plain", lambda request, resp: False)
        m.setattr(http_answer, "stream_head", lambda request, resp: None)
        reference = await _exchange(server, raw, until_close=closes)
    assert fast.startswith(b"HTTP/1.")
    assert _DATE.sub(b"\r\n", fast) == _DATE.sub(b"\r\n", reference)
    assert fast.count(b"\r\nDate: ") == reference.count(b"\r\nDate: ")


async def test_fast_path_is_taken_for_a_plain_answer(
    server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    encode = http_answer.encode

    def counting(request: web.BaseRequest, resp: web.Response) -> bytes:
        taken.append(resp.status)
        return encode(request, resp)

    monkeypatch.setattr(http_answer, "encode", counting)
    await _exchange(server, _get("/json") + _get("/no-content") + _get("/error"), until_close=True)
    assert taken == [200, 400]  # 204 takes aiohttp's path


async def test_connection_close_ends_the_connection(server: int) -> None:
    # The error answer forces a close: what was pipelined after it is never answered.
    out = await _exchange(server, _get("/error") + _get("/json"), until_close=True)
    assert out.count(b"HTTP/1.1 ") == 1
    assert b"\r\nConnection: close\r\n" in out
    assert out.endswith(b'{"error":{}}')


async def test_header_with_crlf_is_never_sent(server: int) -> None:
    out = await _exchange(server, _get("/bad-header"), until_close=True)
    assert b"Injected" not in out
    assert b"x-evil" not in out


async def test_keep_alive_serves_many_on_one_connection(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        for i in range(50):
            body = f"body-{i}".encode()
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            writer.write(head + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Connection" not in head
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            assert await reader.readexactly(length) == body
    finally:
        writer.close()


@spies_on_internals
async def test_stream_takes_the_fast_path(
    server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads: list[bytes | None] = []
    stream_head = http_answer.stream_head

    def recording(request: web.BaseRequest, resp: web.StreamResponse) -> bytes | None:
        heads.append(stream_head(request, resp))
        return heads[-1]

    monkeypatch.setattr(http_answer, "stream_head", recording)
    out = await _exchange(server, _get("/stream?tail", "Connection: close"), until_close=True)
    assert len(heads) == 1 and heads[0] is not None
    assert out.startswith(heads[0])
    assert out.endswith(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    # HTTP/1.0 has no chunked encoding: aiohttp's path, which closes the connection.
    heads.clear()
    out = await _exchange(server, b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n", until_close=True)
    assert heads == [None]
    assert b"Transfer-Encoding" not in out and out.endswith(b"data: two\n\n")


async def test_an_error_after_a_stream_started_closes_the_connection(server: int) -> None:
    # aiohttp answers a failed handler with a 500 unless a response is under way: the
    # stream's bytes count, so the connection closes after them and nothing else is sent.
    out = await _exchange(server, _get("/stream-raise") + _get("/json"), until_close=True)
    assert out.count(b"HTTP/1.1 ") == 1
    assert out.endswith(b"b\r\ndata: one\n\n\r\n")


async def test_a_stream_replaced_by_another_answer_never_sends_its_head(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        writer.write(_get("/stream-replaced") + _get("/json"))
        await asyncio.sleep(stream_response.HEADERS_AFTER * 3)  # past the stream's timer
        writer.write(_get("/empty", "Connection: close"))
        out = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    statuses = re.findall(rb"HTTP/1.1 (\d+)", out)
    assert statuses == [b"503", b"200", b"200"], out
    assert b"text/event-stream" not in out


@pytest.mark.parametrize("path", ["/big", "/big-stream"])
async def test_a_slow_reader_gets_everything_then_the_next_answer(server: int, path: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server, limit=1 << 16)
    try:
        writer.write(_get(path) + _get("/json", "Connection: close"))
        await asyncio.sleep(0.3)  # the server's socket buffer fills: its writes pause
        data = b""
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while loop.time() < end:
            piece = await asyncio.wait_for(reader.read(1 << 16), 5)
            if not piece:
                break
            data += piece
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.count(b"z") == BIG
    assert data.endswith(b'{"ok":true}')
