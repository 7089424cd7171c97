"""A gate's verdict on one tool call, and the error result the model is shown when blocked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.config import OnBlock
from proxy.toolcalls import ToolCall


@dataclass(slots=True, frozen=True)
class Block:
    gate: str  # "rules" | "approval" | "rate_limit" | "budget"
    reason: str  # machine-readable: tool_not_allowed, invalid_arguments, rule, max_calls, ...
    message: str  # human-readable, seed wording: "Rate limit: 10 >= 10"
    retry_after: float | None = None


@dataclass(slots=True)
class Decision:
    call: ToolCall
    tool_policy: str  # the policy entry that applied: the tool's name or "*"
    on_block: OnBlock
    block: Block | None = None
    # Blocks a shadow-mode gate would have made; recorded, never enforced.
    shadow: list[Block] = field(default_factory=list)
    # Gates that let the call through only because the store failed and they fail open.
    fail_open: list[str] = field(default_factory=list)
    args: Any = None
    unread: bool = False  # the arguments could not be read: steps that look at them are skipped
    token: list[tuple[str, str]] = field(default_factory=list)
    latency_ms: float = 0.0
    # Set by the auditor: a decision has one record, made before the client can see the call
    # (a stream records an allowed call as it sends it, before its round is settled).
    recorded: bool = False
    # The human approval this call was asked for or passed with: {"id", "state"}.
    approval: dict[str, Any] | None = None

    @property
    def allowed(self) -> bool:
        return self.block is None

    def error_result(self) -> dict[str, Any]:
        """The small JSON the model gets in place of the tool's output."""
        assert self.block is not None
        result: dict[str, Any] = {
            "error": "tool_call_blocked",
            "gate": self.block.gate,
            "reason": self.block.reason,
            "message": self.block.message,
        }
        if self.block.retry_after is not None:
            result["retry_after"] = round(self.block.retry_after, 3)
        if self.approval is not None:
            result["approval_id"] = self.approval["id"]
        return result
