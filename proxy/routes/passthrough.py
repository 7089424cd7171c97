"""Every other `/v1/*` route: forwarded verbatim, bodies streamed both ways."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import error_response
from proxy.paths import ungated_api
from proxy.state import STATE
from proxy.transport import TARGET, relay, upstream_failure, upstream_path
from proxy.upstream import UpstreamError


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
        return upstream_failure(exc)
    return await relay(request, resp)
