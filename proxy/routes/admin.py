"""`/admin`: the approvals API and page (not behind the /v1 auth: it has its own).

    GET  /admin                             the approvals page (static; it asks for a credential)
    GET  /admin/approvals?state=pending     {"data": [approval, ...]}, newest first
    GET  /admin/approvals/{id}              one approval
    POST /admin/approvals/{id}/approve      {"comment": "..."} (optional)
    POST /admin/approvals/{id}/deny         {"comment": "..."} (optional)
    GET  /admin/decisions?since=N           the recent decisions feed and per-tool counters

Who may come in, as `Authorization: Bearer ...`:
- `server.admin_token` (compared in constant time): a superuser, who may answer any approval;
- a JWT that `auth.jwt` verifies and that carries groups: an approver, who sees and may answer
  only the approvals whose tool's `approvers` share a group with the token (an approval with no
  `approvers` is anyone's). Approval events name the token's principal.
With neither configured, every /admin path answers 404 (nothing there to find).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from proxy.approvals import ApprovalError, Approvals
from proxy.audit import AuditUnavailable
from proxy.auth.identity import AuthFailure
from proxy.errors import error_response
from proxy.principal import canonical
from proxy.state import STATE

STATES = frozenset(("pending", "approved", "denied", "used", "expired"))
MAX_COMMENT = 2000
BY = "admin-token"
ADMIN_JWT = "admin_jwt"  # AppState.extra: the JwtVerifier /admin uses (None: no JWT admins)
FEED = "admin_feed"
FEED_SIZE = 500  # recent decisions kept for the page (this process's)
MAX_TOOLS = 1000  # per-tool counters; the model names tools, so their number is bounded
OTHER_TOOLS = "(other tools)"
MAX_NAME = 200


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def token_matches(presented: str, token: str) -> bool:
    # Digests of both: compare_digest then also hides the token's length.
    return hmac.compare_digest(_digest(presented), _digest(token))


@dataclass(frozen=True, slots=True)
class Approver:
    """Who is at /admin: `groups` None for the admin token (a superuser)."""

    by: str
    via: str
    groups: tuple[str, ...] | None = None
    credential: str | None = None

    def may_answer(self, approval: dict[str, Any]) -> bool:
        if self.groups is None:
            return True
        wanted = approval.get("approvers") or ()
        # Both sides canonical, as the identity's groups are (proxy.principal.canonical).
        return not wanted or any(canonical(g) in self.groups for g in wanted)


def _unauthorized(message: str) -> web.Response:
    return error_response(
        401,
        message,
        "invalid_request_error",
        "invalid_admin_token",
        headers={"WWW-Authenticate": 'Bearer realm="callgate-admin"'},
    )


def _not_here() -> web.Response:
    return error_response(404, "Not found", "invalid_request_error", "not_found")


def _configured(request: web.Request) -> bool:
    state = request.app[STATE]
    return (
        state.policy.config.server.admin_token is not None
        or state.extra.get(ADMIN_JWT) is not None
    )


async def approver(request: web.Request) -> Approver | web.Response:
    """Who the request is, or the answer it gets (404: no admin access configured; 401)."""
    state = request.app[STATE]
    token = state.policy.config.server.admin_token  # a reload may rotate it
    verifier: Any = state.extra.get(ADMIN_JWT)  # a proxy.auth.jwt.JwtVerifier, or None
    if token is None and verifier is None:
        return _not_here()
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return _unauthorized(
            "Missing admin credential (Authorization: Bearer <server.admin_token or a JWT>)"
        )
    if token is not None and token_matches(presented, token):
        return Approver(BY, "admin_token")
    if verifier is not None and presented.count(".") == 2:
        identity = await verifier.verify(presented)
        if isinstance(identity, AuthFailure):
            return _unauthorized(identity.message)
        if not identity.groups:
            return error_response(
                403,
                "The token carries no groups: only a member of an approval's approvers may"
                " answer it",
                "invalid_request_error",
                "not_an_approver",
            )
        return Approver(identity.principal, "jwt", identity.groups, identity.credential_id)
    return _unauthorized(
        "Missing or wrong admin credential (Authorization: Bearer <server.admin_token or a JWT>)"
    )


def _not_yours(approval_id: str) -> web.Response:
    return error_response(
        403,
        f"Approval {approval_id} is not for your groups (its tool's approvers)",
        "invalid_request_error",
        "not_an_approver",
    )


def _service(request: web.Request) -> Approvals:
    service = request.app[STATE].extra["approvals"]
    assert isinstance(service, Approvals)
    return service


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def page(request: web.Request) -> web.StreamResponse:
    if not _configured(request):
        return _not_here()
    # The page holds no data: its script asks for a credential and calls the API with it.
    html = resources.files("proxy").joinpath("admin_page.html").read_bytes()
    return web.Response(
        body=html,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline';"
            " style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


async def list_approvals(request: web.Request) -> web.Response:
    who = await approver(request)
    if isinstance(who, web.Response):
        return who
    state = request.query.get("state")
    if state is not None and state not in STATES:
        return error_response(
            400, f"state must be one of {', '.join(sorted(STATES))}", "invalid_request_error"
        )
    found = [a for a in await _service(request).list(state) if who.may_answer(a)]
    return _json({"object": "list", "data": found})


async def get_approval(request: web.Request) -> web.Response:
    who = await approver(request)
    if isinstance(who, web.Response):
        return who
    approval_id = request.match_info["id"]
    found = await _service(request).get(approval_id)
    if found is None:
        return error_response(404, "No such approval", "invalid_request_error", "not_found")
    if not who.may_answer(found):
        return _not_yours(approval_id)
    return _json(found)


async def _answer(request: web.Request, approve: bool) -> web.Response:
    who = await approver(request)
    if isinstance(who, web.Response):
        return who
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
    service = _service(request)
    approval_id = request.match_info["id"]
    if who.groups is not None:
        # Checked against the stored approval (its approvers as recorded when it was asked):
        # decide() then re-reads it and answers it only if it is still pending.
        found = await service.get(approval_id)
        if found is not None and not who.may_answer(found):
            return _not_yours(approval_id)
    try:
        decided = await service.decide(
            approval_id, approve, who.by, comment, via=who.via, credential=who.credential
        )
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


# --- the decisions feed ----------------------------------------------------------------------


def _name(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_NAME else text[:MAX_NAME] + "…"


class Feed:
    """The recent decisions of this process, for the page: a ring of the last FEED_SIZE audit
    records (what was decided, never the arguments) and counters by tool. Fed by the auditor's
    listeners, so it costs one small dict per decision."""

    def __init__(self, size: int = FEED_SIZE) -> None:
        self.ring: deque[dict[str, Any]] = deque(maxlen=size)
        self.seq = 0
        # tool -> {"allowed": n, "blocked": n, "gates": {gate: n}}
        self.counters: dict[str, dict[str, Any]] = {}

    def _push(self, entry: dict[str, Any]) -> None:
        self.seq += 1
        entry["seq"] = self.seq
        self.ring.append(entry)

    def on_decision(self, record: dict[str, Any]) -> None:
        tool = _name(record["tool"])
        decision = record["decision"]
        gate = record["gate"]
        entry = {
            "kind": "decision",
            "time": record["time"],
            "tool": tool,
            "decision": decision,
            "gate": gate,
            "reason": record["reason"],
            "action": record["action"],
            "principal": record["principal"],
            "request_id": record["request_id"],
            "route": record["route"],
        }
        if "approval" in record:
            entry["approval"] = record["approval"]
        self._push(entry)
        counts = self.counters.get(tool)
        if counts is None:
            if len(self.counters) >= MAX_TOOLS:
                tool = OTHER_TOOLS
                counts = self.counters.get(tool)
            if counts is None:
                counts = self.counters[tool] = {"allowed": 0, "blocked": 0, "gates": {}}
        key = "blocked" if decision == "blocked" else "allowed"
        counts[key] += 1
        if key == "blocked" and gate:
            gates = counts["gates"]
            gates[gate] = gates.get(gate, 0) + 1

    def on_event(self, record: dict[str, Any]) -> None:
        kind = str(record.get("event", ""))
        if not kind.startswith("approval."):
            return
        self._push(
            {
                "kind": kind,
                "time": record.get("time"),
                "tool": _name(record.get("tool", "")),
                "approval": record.get("approval"),
                "principal": record.get("principal"),
                "by": record.get("by"),
                "comment": record.get("comment"),
            }
        )

    def since(self, after: int) -> dict[str, Any]:
        first = self.ring[0]["seq"] if self.ring else self.seq + 1
        return {
            "object": "list",
            "data": [e for e in self.ring if e["seq"] > after],
            "last": self.seq,
            # Entries after `since` that the ring no longer holds (the page polled too late).
            "missed": max(0, first - after - 1),
            "counters": self.counters,
        }


async def decisions(request: web.Request) -> web.Response:
    who = await approver(request)
    if isinstance(who, web.Response):
        return who
    try:
        after = int(request.query.get("since", "0"))
    except ValueError:
        return error_response(
            400, "since must be an integer", "invalid_request_error", param="since"
        )
    feed = request.app[STATE].extra[FEED]
    assert isinstance(feed, Feed)
    return _json(feed.since(max(after, 0)))


# --- wiring ------------------------------------------------------------------------------------


def setup(app: web.Application, authenticator: Any = None) -> None:
    """Routes, the feed's listeners, and the JWT verifier of approvers (`auth.jwt`: the /v1
    authenticator's when it has one, else one of /admin's own)."""
    state = app[STATE]
    feed = Feed()
    state.extra[FEED] = feed
    state.auditor.listeners.append(feed.on_decision)
    state.auditor.event_listeners.append(feed.on_event)
    auth = state.policy.config.auth
    verifier: Any = None
    if auth is not None and auth.jwt is not None:
        verifier = getattr(authenticator, "jwt", None)
        if verifier is None:
            from proxy.auth.jwt import JwtVerifier

            own = JwtVerifier(auth.jwt)
            verifier = own

            async def start(_: web.Application) -> None:
                await own.start()

            async def stop(_: web.Application) -> None:
                await own.close()

            app.on_startup.append(start)
            app.on_cleanup.append(stop)
    state.extra[ADMIN_JWT] = verifier
    router = app.router
    router.add_get("/admin", page)
    router.add_get("/admin/approvals", list_approvals)
    router.add_get("/admin/approvals/{id}", get_approval)
    router.add_post("/admin/approvals/{id}/approve", approve)
    router.add_post("/admin/approvals/{id}/deny", deny)
    router.add_get("/admin/decisions", decisions)
