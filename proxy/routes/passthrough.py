"""Every other `/v1/*` route: forwarded verbatim, bodies streamed both ways."""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from proxy import http1
from proxy.errors import error_response
from proxy.paths import Target, ungated_api
from proxy.state import STATE
from proxy.upstream import UpstreamError, response_headers

log = structlog.get_logger("callgate.passthrough")


# The request target as checked by proxy.app's path guard (proxy.paths): canonical, so what
# callgate routed on is what the upstream gets.
TARGET: web.RequestKey[Target] = web.RequestKey("callgate_target", Target)


def upstream_path(request: web.Request) -> str:
    """The path and query relative to /v1, as sent by the client: the path the guard checked
    (never aiohttp's re-parsed URL, which can differ for an absolute-form request line) and the
    query as sent."""
    return request[TARGET].upstream()


async def relay(
    request: web.Request,
    resp: aiohttp.ClientResponse | http1.Response,
    *,
    decoded: bool = False,
) -> web.StreamResponse:
    """Send an upstream response on as it arrives; the caller has not read its body."""
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.extend(response_headers(resp.headers, decoded))
    try:
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
    except ConnectionResetError:
        # First: aiohttp's ClientConnectionResetError (writing to a client that left) is also a
        # ClientError, and must not be reported as the upstream's fault.
        log.info("client_disconnected")
        resp.close()  # stop reading the upstream: its connection cannot be reused mid-body
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: all we can do is cut the connection so the client sees it.
        log.warning("upstream_stream_broken", error=f"{type(exc).__name__}: {exc}")
        if request.transport is not None:
            request.transport.close()
    finally:
        resp.release()
    return out


async def forward(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    api = ungated_api(request[TARGET].path)
    if api is not None and api not in state.policy.config.server.ungated_apis:
        return error_response(
            403,
            f"callgate cannot gate the tool calls of the {api} API, so it does not forward it; "
            f"use Chat Completions or Responses, or list {api!r} in server.ungated_apis.",
            "invalid_request_error",
            "ungated_api",
        )
    data = request.content.iter_any() if request.body_exists else None
    try:
        resp = await state.upstream.open_raw(
            request.method,
            upstream_path(request),
            # Tracing: the upstream's parent is this request's span, not the client's.
            request.headers if state.tracing is None else state.tracing.propagated(request),
            data,
            content_length=request.content_length,
        )
    except UpstreamError as exc:
        broken = request.content.exception()
        if isinstance(broken, web.HTTPException | web.RequestPayloadError):
            raise broken from None  # the client's body was malformed, not the upstream: a 400
        return error_response(exc.status, str(exc), "upstream_error", exc.code)
    return await relay(request, resp)
