"""The allow list: `allow: false` blocks every call to the tool, whatever its arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.gates.decision import Block, Decision
from proxy.toolcalls import CallContext


@dataclass(frozen=True, slots=True)
class Allow:
    enforce: bool
    name: str = "rules"
    kind: str = "allow"
    needs_args: bool = True

    def check(self, decision: Decision, ctx: CallContext) -> Block | None:
        message = f"Policy violation: tool {decision.call.name!r} is not allowed"
        return Block(self.name, "tool_not_allowed", message)

    def describe(self) -> str:
        return "not allowed"


def build(tool: Any) -> Allow | None:
    return None if tool.allow else Allow(tool.rules_mode == "enforce")
