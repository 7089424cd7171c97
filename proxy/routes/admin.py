"""`/admin`: the approvals API and page, behind `server.admin_token` (not the /v1 auth).

    GET  /admin                             the approvals page (static; it asks for the token)
    GET  /admin/approvals?state=pending     {"data": [approval, ...]}, newest first
    GET  /admin/approvals/{id}              one approval
    POST /admin/approvals/{id}/approve      {"comment": "..."} (optional)
    POST /admin/approvals/{id}/deny         {"comment": "..."} (optional)

`Authorization: Bearer <admin_token>`, compared in constant time; without a configured token
every /admin path answers 404 (nothing there to find).
"""

from __future__ import annotations

import hashlib
import hmac
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from proxy.approvals import ApprovalError, Approvals
from proxy.audit import AuditUnavailable
from proxy.errors import error_response
from proxy.state import STATE

STATES = frozenset(("pending", "approved", "denied", "used", "expired"))
MAX_COMMENT = 2000
BY = "admin-token"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def refused(request: web.Request) -> web.Response | None:
    """None when the request carries the admin token; else the answer (404 or 401)."""
    token = request.app[STATE].policy.config.server.admin_token  # a reload may rotate it
    if token is None:
        return error_response(404, "Not found", "invalid_request_error", "not_found")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Digests of both: compare_digest then also hides the token's length.
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        _digest(presented.strip()), _digest(token)
    )
    if not ok:
        return error_response(
            401,
            "Missing or wrong admin token (Authorization: Bearer <server.admin_token>)",
            "invalid_request_error",
            "invalid_admin_token",
            headers={"WWW-Authenticate": 'Bearer realm="callgate-admin"'},
        )
    return None


def _service(request: web.Request) -> Approvals:
    service = request.app[STATE].extra["approvals"]
    assert isinstance(service, Approvals)
    return service


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def page(request: web.Request) -> web.StreamResponse:
    if request.app[STATE].policy.config.server.admin_token is None:
        return error_response(404, "Not found", "invalid_request_error", "not_found")
    # The page holds no data: its script asks for the token and calls the API with it.
    html = resources.files("proxy").joinpath("admin_page.html").read_bytes()
    return web.Response(
        body=html,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline';"
            " style-src 'unsafe-inline'; frame-ancestors 'none'",
            "Cache-Control": "no-store",
        },
    )


async def list_approvals(request: web.Request) -> web.Response:
    if (refusal := refused(request)) is not None:
        return refusal
    state = request.query.get("state")
    if state is not None and state not in STATES:
        return error_response(
            400, f"state must be one of {', '.join(sorted(STATES))}", "invalid_request_error"
        )
    return _json({"object": "list", "data": await _service(request).list(state)})


async def get_approval(request: web.Request) -> web.Response:
    if (refusal := refused(request)) is not None:
        return refusal
    found = await _service(request).get(request.match_info["id"])
    if found is None:
        return error_response(404, "No such approval", "invalid_request_error", "not_found")
    return _json(found)


async def _answer(request: web.Request, approve: bool) -> web.Response:
    if (refusal := refused(request)) is not None:
        return refusal
    raw = await request.read()
    comment = None
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return error_response(400, "The body must be JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "The body must be a JSON object", "invalid_request_error")
        comment = body.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
            return error_response(
                400,
                f"comment must be a string of at most {MAX_COMMENT} characters",
                "invalid_request_error",
                param="comment",
            )
    try:
        decided = await _service(request).decide(request.match_info["id"], approve, BY, comment)
    except ApprovalError as exc:
        code = "not_found" if exc.status == 404 else "conflict"
        return error_response(exc.status, exc.message, "invalid_request_error", code)
    except AuditUnavailable:
        return error_response(
            503,
            "Answered, but its audit record could not be written",
            "server_error",
            "audit_unavailable",
        )
    return _json(decided)


async def approve(request: web.Request) -> web.Response:
    return await _answer(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _answer(request, False)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin", page)
    router.add_get("/admin/approvals", list_approvals)
    router.add_get("/admin/approvals/{id}", get_approval)
    router.add_post("/admin/approvals/{id}/approve", approve)
    router.add_post("/admin/approvals/{id}/deny", deny)
