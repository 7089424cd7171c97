"""The middleware that authenticates every `/v1/*` request before any route sees it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from proxy.auth import IDENTITY, Authenticator, AuthFailure
from proxy.errors import error_response
from proxy.routes.incoming import PRINCIPAL

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger("callgate.auth")


def auth_middleware(authenticator: Authenticator, failures: Any) -> Any:
    """`failures`: the metric counted by reason (proxy.metrics.Metrics.auth_failures)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)  # probes and /metrics: not the upstream's API
        result = await authenticator.authenticate(request.headers, request.remote)
        if isinstance(result, AuthFailure):
            failures.labels(result.reason).inc()
            # The credential is in neither the line nor the answer: only the reason.
            log.info("auth_failed", reason=result.reason, path=request.path)
            # 401 with code invalid_api_key: the OpenAI SDKs raise AuthenticationError and do
            # not retry it.
            return error_response(
                401,
                result.message,
                "invalid_request_error",
                "invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="callgate"'},
            )
        request[IDENTITY] = result
        request[PRINCIPAL] = result.principal
        structlog.contextvars.bind_contextvars(
            principal=result.principal, credential=result.credential_id
        )
        return await handler(request)

    return authenticate
