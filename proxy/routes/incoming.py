"""The client's request: its JSON body, its principal, and the context the gates see."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy.auth.identity import IDENTITY
from proxy.errors import bad_request, error_response
from proxy.policy import Policy
from proxy.principal import resolve_principal
from proxy.request_shape import Problem
from proxy.state import STATE
from proxy.telemetry import request_trace
from proxy.toolcalls import CallContext


class BadRequest(Exception):
    def __init__(self, response: web.Response):
        self.response = response


REQUEST_ID: web.RequestKey[str] = web.RequestKey("callgate_request_id", str)
PRINCIPAL: web.RequestKey[str] = web.RequestKey("callgate_principal", str)


# Unique across replicas and restarts without a system call per request: a random per-process
# prefix and a counter.
_ID_PREFIX = "cg-" + secrets.token_hex(6) + "-"
_ids = itertools.count(1)


def request_id(request: web.Request) -> str:
    # Not request.get(): the Mapping mixin's get() raises and catches a KeyError when absent,
    # and the id is absent once for every request. `_state` is the dict behind aiohttp's
    # Request mapping (every aiohttp 3.x has it).
    if REQUEST_ID in request._state:
        return request[REQUEST_ID]
    rid = request[REQUEST_ID] = f"{_ID_PREFIX}{next(_ids):x}"
    return rid


async def read_json(
    request: web.Request, check: Callable[[dict[str, Any]], Problem | None] | None = None
) -> tuple[bytes, dict[str, Any]]:
    """The body as bytes and as a JSON object; BadRequest when it is not one, or when `check`
    (proxy.request_shape) finds a field callgate reads in a shape it cannot read."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            bad_request(f"We could not parse the JSON body of your request: {exc}")
        ) from None
    if not isinstance(body, dict):
        raise BadRequest(bad_request("The request body must be a JSON object."))
    problem = check(body) if check is not None else None
    if problem is not None:
        message, param, code = problem
        raise BadRequest(error_response(400, message, "invalid_request_error", code, param))
    return raw, body


def call_context(
    request: web.Request, body: dict[str, Any], policy: Policy, route: str
) -> CallContext:
    # `_state`: see request_id. An authenticated identity is the principal; no header or body
    # field can name another one.
    identity = request._state.get(IDENTITY)
    if identity is None:
        principal = resolve_principal(policy.config.principal.from_, request.headers, body)
    else:
        principal = identity.principal
    metadata = body.get("metadata")
    user = body.get("user")
    ctx = CallContext(
        principal=principal,
        request_id=request_id(request),
        route=route,
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        metadata=metadata if isinstance(metadata, dict) else {},
        user=user if isinstance(user, str) else None,
    )
    ctx.approvals = request.app[STATE].extra.get("approvals")
    if identity is not None:
        ctx.groups = identity.groups
        ctx.credential = identity.credential_id
    structlog.contextvars.bind_contextvars(principal=principal)
    request[PRINCIPAL] = principal
    trace = request_trace(request)
    if trace is not None:  # tracing is on
        trace.bind(ctx)
    return ctx
