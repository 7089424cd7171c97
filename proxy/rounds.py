"""Settle a round once: what happens to a round's tool calls once each is decided.

Shared by both APIs, streaming and not; the routes and stream gates only render the outcome in
their API's shape. The strictest `on_block` among the blocked calls wins: `error` fails the
request; `reprompt` asks the model again when every call was blocked (and rounds remain);
otherwise blocked calls are removed (`strip` adds a notice) and stashed when others survive.

One place plans a round, puts it on record, words a block, gives slots back and counts a
reprompt: `plan_round`, `record_round` (or `settle`, both at once), `refuse`, `asked_again`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import structlog

from proxy.audit import Auditor
from proxy.gates import release
from proxy.gates.decision import Decision
from proxy.state import AppState
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.rounds")
# `fail_closed`: a stream that broke off; what the client received stays, the rest is dropped.
Action = Literal["pass", "error", "reprompt", "strip", "drop", "fail_closed"]


@dataclass(slots=True)
class Plan:
    action: Action
    allowed: list[Decision]
    blocked: list[Decision]

    @property
    def partial(self) -> bool:
        return bool(self.allowed) and bool(self.blocked)


def plan(decisions: list[Decision], can_reprompt: bool) -> Plan:
    # One plain loop: runs for every response with tool calls, where two comprehensions cost
    # more than the sorting they do.
    allowed: list[Decision] = []
    blocked: list[Decision] = []
    for d in decisions:
        if d.block is None:  # Decision.allowed, without a property call per decision
            allowed.append(d)
        else:
            blocked.append(d)
    if not blocked:
        return Plan("pass", allowed, blocked)
    modes = {d.on_block for d in blocked}
    if "error" in modes:
        return Plan("error", allowed, blocked)
    if "reprompt" in modes:
        if not allowed and can_reprompt:
            return Plan("reprompt", allowed, blocked)
        if allowed and "strip" not in modes:
            # Some survive: the client gets them, the blocked ones go to the stash silently.
            return Plan("drop", allowed, blocked)
    return Plan("strip", allowed, blocked)


def plan_round(
    decisions: list[Decision], can_reprompt: bool, approvals: list[Decision] | None = None
) -> Plan:
    """The round's plan; a blocked MCP approval whose mode is `error` fails the response."""
    p = plan(decisions, can_reprompt)
    if approvals and p.action != "error":
        if any(not d.allowed and d.on_block == "error" for d in approvals):
            return Plan("error", p.allowed, p.blocked)
    return p


def audit_plan(auditor: Auditor, p: Plan, ctx: CallContext) -> None:
    """One record per decision, once its fate is known."""
    for d in p.allowed:
        if p.action == "error":
            auditor.record(d, ctx, "withheld", "error")
        else:
            auditor.record(d, ctx, "allowed", None)
    for d in p.blocked:
        action: str = p.action
        if action in ("drop", "strip") and p.partial:
            action = f"{action}+stash"
        auditor.record(d, ctx, "blocked", action)


def record_round(
    state: AppState,
    ctx: CallContext,
    p: Plan,
    decisions: list[Decision],
    approvals: list[Decision] | None = None,
) -> None:
    """The records of a settled round: the MCP approvals, then the calls. A reprompt's blocked
    calls wait for the next round's answer (proxy.reprompt: `asked` or `failed`)."""
    for d in approvals or ():
        if p.action == "error":
            state.auditor.record(d, ctx, "blocked" if d.block else "withheld", "error")
        else:
            state.auditor.record(
                d, ctx, "allowed" if d.allowed else "blocked", "approve" if d.allowed else "deny"
            )
    if decisions and p.action != "reprompt":
        audit_plan(state.auditor, p, ctx)


def settle(
    state: AppState,
    ctx: CallContext,
    decisions: list[Decision],
    can_reprompt: bool,
    approvals: list[Decision] | None = None,
) -> Plan:
    """Plan the round and put it on record."""
    p = plan_round(decisions, can_reprompt, approvals)
    record_round(state, ctx, p, decisions, approvals)
    return p


@dataclass(frozen=True, slots=True)
class Refusal:
    """A round that fails the request: the client gets this error (a 403, or an error event in
    a stream) and none of the round's calls."""

    message: str
    code: str  # the gate that blocked
    type: str = "tool_call_blocked"
    status: int = 403


async def refuse(
    state: AppState, p: Plan, approvals: list[Decision] | None = None
) -> Refusal:
    """A round planned as `error`: every allowed call's reservation given back (none of them
    reaches the client), and the first block worded for the client."""
    approvals = approvals or []
    await release(state.store, [*p.allowed, *(d for d in approvals if d.allowed)])
    first = next(d for d in [*p.blocked, *approvals] if not d.allowed)
    assert first.block is not None
    message = f"Tool call {first.call.name!r} blocked by callgate: {first.block.message}"
    return Refusal(message, first.block.gate)


def asked_again(state: AppState, route: str, round_: int, blocked: int, **extra: object) -> None:
    """A reprompt round is asked for: counted and logged here, once per round."""
    state.metrics.reprompts.labels(route).inc()
    log.info("reprompt", round=round_, blocked=blocked, **extra)
