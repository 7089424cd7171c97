"""What operators and orchestrators ask: liveness, readiness, and the Prometheus scrape."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.state import STATE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    try:
        await state.store.ping()
    except Exception as exc:
        return web.json_response({"status": "store unreachable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ready", "policy": state.policy.source})


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[STATE].metrics
    body = metrics.exposition() if metrics.shared is None else await metrics.shared.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
