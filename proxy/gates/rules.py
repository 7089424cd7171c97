"""The rules step: a tool's CEL expressions (`deny_if` / `allow_if`), in order.

A rule that raises blocks: a policy that cannot be evaluated fails closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.gates.decision import Block, Decision
from proxy.policy import Rule
from proxy.toolcalls import CallContext

GATE = "rules"


@dataclass(frozen=True, slots=True)
class Rules:
    enforce: bool
    rules: tuple[Rule, ...]
    has_schema: bool
    name: str = GATE
    kind: str = "rules"
    needs_args: bool = True

    def check(self, decision: Decision, ctx: CallContext) -> Block | None:
        if not self.rules:
            return None
        call = decision.call
        env = {
            "args": decision.args,
            "tool": call.name,
            "principal": ctx.principal,
            "request": ctx.request_vars,  # built only for rules that read it
        }
        for rule in self.rules:
            try:
                result = rule.program.run(env)
            except Exception as exc:  # missing field, type error, ...: fail closed
                return Block(GATE, "rule_error", f"{_label(rule)} (rule error: {exc})")
            if result is rule.deny:
                label = _label(rule)
                return Block(GATE, "rule", f"{label}: {rule.message}" if rule.message else label)
            if not isinstance(result, bool):
                return Block(
                    GATE, "rule_error", f"{_label(rule)} (rule returned {type(result).__name__})"
                )
        return None

    def describe(self) -> str:
        return f"{len(self.rules)} rule(s)" + (", schema" if self.has_schema else "")


def _label(rule: Rule) -> str:
    return f"Policy violation: {rule.name}"


def build(tool: Any) -> Rules:
    # Always in the list, even without rules: explain reports the rules step on every tool.
    return Rules(tool.rules_mode == "enforce", tool.rules, tool.schema is not None)
