"""The approval step: calls that need a person's yes (`approval` on a tool; proxy.approvals).

After the rules (a call they block never pages anyone) and before the reservations (a call
waiting for approval takes no rate-limit slot and spends no budget). A `when` that cannot be
evaluated asks for approval (fails closed). It looks at the arguments even when they could not
be read (a shadow-mode rules step lets such a call on): the grant is then bound to their text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.gates.decision import Block, Decision
from proxy.policy import Approval
from proxy.toolcalls import CallContext

GATE = "approval"


@dataclass(frozen=True, slots=True)
class ApprovalGate:
    rule: Approval
    name: str = GATE
    kind: str = GATE
    enforce: bool = True
    needs_args: bool = False

    def needed(self, decision: Decision, ctx: CallContext) -> bool:
        when = self.rule.when
        if when is None or decision.unread:
            return True
        env = {
            "args": decision.args,
            "tool": decision.call.name,
            "principal": ctx.principal,
            "request": ctx.request_vars,
        }
        try:
            return when.run(env) is not False  # True, or not a bool: ask
        except Exception:  # missing field, type error: ask rather than let it through
            return True

    async def check(self, decision: Decision, ctx: CallContext) -> Block | None:
        if not self.needed(decision, ctx):
            return None
        if ctx.approvals is None:
            # explain, policy tests, replay: nobody to ask, so the call would wait for a person.
            return Block(GATE, "approval_required", "Approval required: a person must approve")
        block: Block | None = await ctx.approvals.gate(decision, ctx, self.rule)
        return block

    def describe(self) -> str:
        rule = self.rule
        when = "some calls" if rule.when is not None else "every call"
        return f"{when}, ttl={rule.ttl:g}s" + (f", wait={rule.wait:g}s" if rule.wait else "")


def build(tool: Any) -> ApprovalGate | None:
    return None if tool.approval is None else ApprovalGate(tool.approval)
