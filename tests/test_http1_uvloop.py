"""callgate's HTTP/1.1 client on uvloop, the event loop `callgate serve` uses when installed
(the rest of the suite runs on asyncio's): keep-alive, chunked streams, flow control, timeouts."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from proxy.http1 import HIGH_WATER, Origin, Pool

uvloop = pytest.importorskip("uvloop")

BIG = bytes(range(256)) * (3 * HIGH_WATER // 256)  # three times the pause threshold


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target == b"/stream":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(3):
                    event = b"data: %d\n\n" % i
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")
            elif target == b"/big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG)
            elif target == b"/stall":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                await writer.drain()
                await asyncio.sleep(5)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _scenario() -> None:
    accepted = 0

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await _serve(reader, writer)

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    origin = Origin("http", "127.0.0.1", port)
    pool = Pool(limit=4, connect_timeout=2, read_timeout=0.3)
    try:
        for _ in range(3):
            resp = await pool.request(origin, "GET", "/", [], None)
            assert (resp.status, await resp.read()) == (200, b"ok")
            resp.release()
        assert accepted == 1  # one kept-alive connection

        resp = await pool.request(origin, "GET", "/stream", [], None)
        chunks = [c async for c in resp.content.iter_any()]
        assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert len(chunks) == 3
        resp.release()

        resp = await pool.request(origin, "GET", "/big", [], None)
        got = hashlib.sha256()
        while (piece := await resp.next_chunk()) is not None:
            got.update(piece)
            await asyncio.sleep(0.002)  # a slow reader: the connection pauses and resumes
        assert got.digest() == hashlib.sha256(BIG).digest()
        resp.release()

        resp = await pool.request(origin, "GET", "/stall", [], None)
        with pytest.raises(aiohttp.ServerTimeoutError):
            await resp.read()
        resp.release()
        resp = await pool.request(origin, "GET", "/", [], None)
        assert await resp.read() == b"ok"
        resp.release()
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


def test_http1_client_on_uvloop() -> None:
    uvloop.run(asyncio.wait_for(_scenario(), 20))
