"""A fast OpenAI-compatible mock for the benchmark: answers `POST /v1/chat/completions` with a
fixed ~1 KB completion holding one tool call, or (`"stream": true`) a 20-chunk SSE stream.

    python -m bench.mock_upstream --port 9000 [--loop uvloop] [--chunk-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

from bench.common import COMPLETION, STREAM, UPSTREAM_HEADERS, run, until_signalled


def make_app(chunk_delay: float = 0.0) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if body.get("stream") is not True:
            return web.Response(
                body=COMPLETION, content_type="application/json", headers=UPSTREAM_HEADERS
            )
        resp = web.StreamResponse(
            headers={**UPSTREAM_HEADERS, "Content-Type": "text/event-stream; charset=utf-8"}
        )
        await resp.prepare(request)
        for event in STREAM:
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def traces(request: web.Request) -> web.Response:
        # `bench.run --otel`: callgate's OTLP exporter posts its spans here (read, then dropped).
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int, chunk_delay: float) -> None:
    runner = web.AppRunner(make_app(chunk_delay), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await until_signalled()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    run(lambda: serve(args.port, args.chunk_delay_ms / 1000), args.loop)


if __name__ == "__main__":
    main()
