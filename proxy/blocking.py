"""What to do with a response once its calls are decided: the `on_block` modes.

Shared by both APIs. The strictest mode among the blocked calls wins: `error` fails the
request; `reprompt` asks the model again when every call was blocked (and rounds remain);
otherwise blocked calls are removed (`strip` adds a notice) and stashed when others survive.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.audit import Auditor
from proxy.gates.decision import Decision
from proxy.toolcalls import CallContext


@dataclass(slots=True)
class Plan:
    action: str  # "pass" | "error" | "reprompt" | "strip" | "drop"
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


def audit_plan(auditor: Auditor, p: Plan, ctx: CallContext) -> None:
    """One record per decision, once its fate is known."""
    for d in p.allowed:
        if p.action == "error":
            auditor.record(d, ctx, "withheld", "error")
        else:
            auditor.record(d, ctx, "allowed", None)
    for d in p.blocked:
        action = p.action
        if action in ("drop", "strip") and p.partial:
            action = f"{action}+stash"
        auditor.record(d, ctx, "blocked", action)
