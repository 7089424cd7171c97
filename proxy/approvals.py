"""Human approval: calls held for a person, and the single-use grants a person gives.

A tool with `approval` (proxy.gates.approval) sends each call that needs one here. The call is
bound to a digest of (tool, canonical arguments, principal, policy identity); the approval open
for that digest (in the store, so every replica sees it) decides:

- none: a pending approval is stored (the webhook is told), and the call is blocked
  `approval_required`, its id in the message; identical calls meanwhile reuse it;
- pending: blocked `approval_required` again (after holding the call up to `wait` seconds for
  a quick approver);
- approved: the grant is used, in one compare-and-set (two replicas racing: one wins), and the
  call goes on to the rate limit and budget; the next identical call asks again;
- denied: blocked `approval_denied`, with the approver's comment, until the denial's ttl ends
  (a model that retries does not page a person again for the same call).

A pending request expires `ttl` seconds after it was made, a grant or denial `ttl` seconds
after it was given. Every step is an audit record in the chain: the blocked call's own record
(reason approval_required, `approval: {id, state}`), `approval.approved` / `approval.denied`
(by whom), the passing call's record (`approval: {id, state: "used"}`), `approval.expired`.
Approvals made by the CLI against Redis are audited by a running server: the CLI queues the
event in the store and each server takes what is queued (one replica per event).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import structlog

from proxy.audit import Auditor
from proxy.gates.decision import Block, Decision
from proxy.policy import Approval
from proxy.store import Store
from proxy.timestamps import utc_iso
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.approvals")

GATE = "approval"
# How long an approval's history stays listed after its grant could last.
HISTORY_SECONDS = 86400.0
POLL_SECONDS = 0.25  # a held call looks for an answer given on another replica this often
EVENTS_SECONDS = 1.0  # a server takes the CLI's queued approval events this often
LIST_LIMIT = 1000


class ApprovalError(Exception):
    """An approve / deny that cannot be done: `status` 404 (unknown id) or 409 (not pending)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def canonical_arguments(decision: Decision) -> bytes:
    """The arguments as a grant is bound to them: parsed JSON with sorted keys (so spacing and
    key order do not matter), or the raw text when they could not be parsed."""
    if not decision.unread and decision.args is not None:
        try:
            return orjson.dumps(decision.args, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # an int beyond 64 bits, ...: the text then
            pass
    return orjson.dumps(decision.call.arguments)


def grant_digest(tool: str, arguments: bytes, principal: str, identity: str) -> str:
    """Each part length-prefixed: no two different calls make the same input."""
    h = hashlib.sha256()
    for part in (
        tool.encode("utf-8", "surrogatepass"),
        arguments,
        principal.encode(),
        identity.encode(),
    ):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def public(record: dict[str, Any]) -> dict[str, Any]:
    """An approval as the admin API, the CLI and the webhook show it."""
    return {k: v for k, v in record.items() if k not in ("created", "expires", "digest")}


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Notifier:
    """Approval webhooks: POSTed in tasks of their own (the request path never waits), retried
    with exponential backoff a bounded number of times, at most `max_pending` in flight."""

    def __init__(
        self,
        secret: str | Callable[[], str | None] | None,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        timeout: float = 5.0,
        max_pending: int = 256,
    ) -> None:
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.max_pending = max_pending
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0

    def send(self, url: str | None, event: str, approval: dict[str, Any]) -> None:
        if url is None:
            return
        if len(self._tasks) >= self.max_pending:
            self.failed += 1
            log.warning("approval_notify_dropped", url=url, id=approval["id"], reason="backlog")
            return
        body = orjson.dumps({"event": event, "approval": public(approval)})
        task = asyncio.get_running_loop().create_task(self._deliver(url, event, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, event: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "X-Callgate-Event": event}
        # A callable: the current policy's server.webhook_secret (a reload may rotate it).
        secret = self.secret() if callable(self.secret) else self.secret
        if secret is not None:
            headers["X-Callgate-Signature"] = sign(secret, body)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        error = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with self._session.post(url, data=body, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        self.delivered += 1
                        return
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            log.info("approval_notify_retry", url=url, attempt=attempt + 1, error=error)
        self.failed += 1
        log.warning("approval_notify_failed", url=url, attempts=self.attempts, error=error)

    async def drain(self) -> None:
        """Wait for the webhooks in flight (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


class Approvals:
    """The approval service of one app (or of the CLI: `auditor` None, events queued)."""

    def __init__(
        self,
        store: Store,
        auditor: Auditor | None,
        *,
        clock: Callable[[], float] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.store = store
        self.auditor = auditor
        self.clock = clock or time.time
        self.notifier = notifier or Notifier(None)
        # Calls held for an answer, by approval id: an answer given here wakes them at once.
        self._held: dict[str, tuple[asyncio.Event, int]] = {}
        self._events_task: asyncio.Task[None] | None = None

    # --- the gate's side -------------------------------------------------------------------

    async def gate(self, decision: Decision, ctx: CallContext, rule: Approval) -> Block | None:
        call = decision.call
        digest = grant_digest(
            call.target or call.name, canonical_arguments(decision), ctx.principal, rule.identity
        )
        held = False
        for _ in range(4):  # each turn: another request or replica changed it meanwhile
            raw = await self.store.find_approval(digest)
            if raw is None:
                record = self._new(decision, ctx, rule, digest)
                keep = 2 * rule.ttl + HISTORY_SECONDS
                found = await self.store.put_approval(
                    record["id"], digest, orjson.dumps(record), keep
                )
                if found != record["id"]:
                    continue  # opened by an identical call meanwhile: that one it is
                log.info("approval_requested", id=record["id"], tool=call.name)
                self.notifier.send(rule.notify, "approval.requested", record)
                approval = record
            else:
                approval = orjson.loads(raw)
            if self.clock() >= approval["expires"]:
                await self._expire(approval)
                continue
            if approval["state"] == "pending" and rule.wait > 0 and not held:
                held = True
                approval = await self._hold(approval, ctx, rule)
                if approval["state"] == "pending" and self.clock() >= approval["expires"]:
                    continue
            state = approval["state"]
            approval_id = approval["id"]
            if state == "approved":
                used = {**approval, "state": "used", "used_at": utc_iso(self.clock())}
                used["used_request_id"] = ctx.request_id
                if await self.store.update_approval(
                    approval_id, digest, "approved", "used", orjson.dumps(used)
                ):
                    decision.approval = {"id": approval_id, "state": "used"}
                    return None
                continue  # used by another call first: this one asks again
            decision.approval = {"id": approval_id, "state": state}
            if state == "denied":
                comment = approval.get("comment")
                return Block(
                    GATE,
                    "approval_denied",
                    f"Approval denied: a person denied this call (approval {approval_id})"
                    + (f": {comment}" if comment else "")
                    + ". Do not make this call again.",
                )
            return Block(
                GATE,
                "approval_required",
                f"Approval required: this call needs a person's approval; a person has been"
                f" asked (approval {approval_id}). Once it is approved, make the identical call"
                f" again (same arguments) within {rule.ttl:g}s.",
            )
        return Block(GATE, "approval_required", "Approval required: the request is changing; retry")

    def _new(
        self, decision: Decision, ctx: CallContext, rule: Approval, digest: str
    ) -> dict[str, Any]:
        now = self.clock()
        args = decision.args if not decision.unread else decision.call.arguments
        return {
            "id": "apr_" + secrets.token_hex(8),
            "state": "pending",
            "tool": decision.call.target or decision.call.name,
            "arguments": args,
            "principal": ctx.principal,
            "groups": list(ctx.groups),
            "request_id": ctx.request_id,
            "route": ctx.route,
            "policy": decision.tool_policy,
            "policy_identity": rule.identity,
            "approvers": list(rule.approvers),
            "ttl": rule.ttl,
            "created_at": utc_iso(now),
            "expires_at": utc_iso(now + rule.ttl),
            "created": now,
            "expires": now + rule.ttl,
            "digest": digest,
        }

    async def _hold(
        self, approval: dict[str, Any], ctx: CallContext, rule: Approval
    ) -> dict[str, Any]:
        """Hold the call up to `wait` seconds (never past its request's deadline) for an answer;
        the approval as it is then."""
        approval_id = approval["id"]
        started = time.monotonic()
        left = rule.max_duration - (started - ctx.started) - 1.0
        until = started + min(rule.wait, left)
        event, count = self._held.get(approval_id, (asyncio.Event(), 0))
        self._held[approval_id] = (event, count + 1)
        try:
            while (now := time.monotonic()) < until:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(POLL_SECONDS, until - now))
                raw = await self.store.get_approval(approval_id)
                if raw is None:
                    break
                current = orjson.loads(raw)
                if current["state"] != "pending" or self.clock() >= current["expires"]:
                    return dict(current)
            return approval
        finally:
            event, count = self._held[approval_id]
            if count <= 1:
                del self._held[approval_id]
            else:
                self._held[approval_id] = (event, count - 1)

    # --- the approvers' side ---------------------------------------------------------------

    async def list(self, state: str | None = None) -> list[dict[str, Any]]:
        """Approvals kept, newest first (`state`: only those); expired ones are marked so."""
        found = []
        for raw in await self.store.list_approvals(LIST_LIMIT):
            approval = orjson.loads(raw)
            if approval["state"] in ("pending", "approved", "denied"):
                if self.clock() >= approval["expires"]:
                    approval = await self._expire(approval) or approval
            if state is None or approval["state"] == state:
                found.append(approval)
        found.sort(key=lambda a: a["created"], reverse=True)
        return [public(a) for a in found]

    async def get(self, approval_id: str) -> dict[str, Any] | None:
        raw = await self.store.get_approval(approval_id)
        return None if raw is None else public(orjson.loads(raw))

    async def decide(
        self,
        approval_id: str,
        approve: bool,
        by: str,
        comment: str | None = None,
        *,
        via: str | None = None,
        credential: str | None = None,
    ) -> dict[str, Any]:
        """Approve or deny a pending approval; ApprovalError if it is unknown or not pending.
        `by`: who answered (a JWT's principal, "admin-token", "cli:<user>"); `via`: how they
        were let in; `credential`: the id of their credential (a JWT's jti), never itself."""
        raw = await self.store.get_approval(approval_id)
        if raw is None:
            raise ApprovalError(404, f"No approval with id {approval_id!r}")
        approval = orjson.loads(raw)
        if approval["state"] == "pending" and self.clock() >= approval["expires"]:
            approval = await self._expire(approval) or approval
        if approval["state"] != "pending":
            raise ApprovalError(409, f"Approval {approval_id} is {approval['state']}, not pending")
        now = self.clock()
        state = "approved" if approve else "denied"
        decided = {
            **approval,
            "state": state,
            "decided_by": by,
            "decided_via": via,
            "decided_at": utc_iso(now),
            "comment": comment or None,
            "expires": now + approval["ttl"],
            "expires_at": utc_iso(now + approval["ttl"]),
        }
        if not await self.store.update_approval(
            approval_id, approval["digest"], "pending", state, orjson.dumps(decided)
        ):
            raise ApprovalError(409, f"Approval {approval_id} was answered meanwhile")
        who = {"by": by, "via": via, "credential": credential}
        await self._audit(
            f"approval.{state}",
            decided,
            **{k: v for k, v in who.items() if v is not None},
            comment=comment or None,
        )
        held = self._held.get(approval_id)
        if held is not None:
            held[0].set()
        return public(decided)

    async def _expire(self, approval: dict[str, Any]) -> dict[str, Any] | None:
        """Mark an approval whose time is up as expired (audited by whoever marks it)."""
        was = approval["state"]
        expired = {**approval, "state": "expired"}
        if await self.store.update_approval(
            approval["id"], approval["digest"], was, "expired", orjson.dumps(expired)
        ):
            await self._audit("approval.expired", expired, was=was)
            return expired
        return None

    async def _audit(self, kind: str, approval: dict[str, Any], **extra: Any) -> None:
        fields = {
            "approval": approval["id"],
            "tool": approval["tool"],
            "principal": approval["principal"],
            "arguments": approval["arguments"],
            "policy_identity": approval["policy_identity"],
            **extra,
        }
        if self.auditor is not None:
            self.auditor.event(kind, fields)
            await self.auditor.durable()
        else:
            # Outside a server (the CLI): queued for a running server to put in its chain.
            await self.store.push_approval_event(orjson.dumps({"kind": kind, "fields": fields}))

    # --- lifecycle -------------------------------------------------------------------------

    async def take_events(self) -> int:
        """Audit the approval events the CLI queued; how many."""
        if self.auditor is None:
            return 0
        events = await self.store.pop_approval_events(100)
        for raw in events:
            try:
                event = orjson.loads(raw)
                self.auditor.event(str(event["kind"]), dict(event["fields"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("approval_event_unreadable", size=len(raw))
        if events:
            await self.auditor.durable()
        return len(events)

    async def _take_events_forever(self) -> None:
        while True:
            await asyncio.sleep(EVENTS_SECONDS)
            try:
                while await self.take_events() == 100:
                    pass
            except Exception as exc:  # the store is away: the events wait there
                log.warning("approval_events_failed", error=f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        self._events_task = asyncio.get_running_loop().create_task(self._take_events_forever())

    async def close(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events_task
        await self.notifier.close()
