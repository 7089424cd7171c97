"""proxy.http_guard's request loop: a connection's requests run in its own task, in order,
and nothing of one request's context reaches the next."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from proxy.config import ServerConfig
from proxy.server import make_runner


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = make_runner(app, ServerConfig())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_context_and_order_per_connection() -> None:
    seen: list[tuple[str, dict[str, object], asyncio.Task[object] | None]] = []

    async def handler(request: web.Request) -> web.Response:
        # What the request finds bound, then binds something of its own and never clears it.
        bound = dict(structlog.contextvars.get_contextvars())
        seen.append((request.path, bound, asyncio.current_task()))
        structlog.contextvars.bind_contextvars(leaked_from=request.path)
        if request.path == "/boom":
            raise RuntimeError("handler failed")
        await asyncio.sleep(0.01)  # later pipelined requests wait their turn
        return web.Response(text=request.path)

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner, port = await _serve(app)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"".join(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in ("a", "boom", "c"))
        )
        # /boom's 500 closes the connection (as aiohttp): /c is never answered.
        data = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(reader2.read(-1), 5)
        writer2.close()
    finally:
        await runner.cleanup()
    assert data.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 500 " in data
    assert [path for path, _, _ in seen] == ["/a", "/boom", "/d"]
    assert all(bound == {} for _, bound, _ in seen), seen  # nothing leaked into a request
    (_, _, first), (_, _, second), (_, _, other) = seen
    assert first is second and second is not other  # a task per connection, not per request
