"""The tool call as the gates see it, whichever API or wire format it came from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    # Function calls: the JSON arguments string. Custom tools: the free-form input.
    arguments: str
    # "function" | "custom" | a Responses built-in call type ("shell_call", "apply_patch_call",
    # ...), whose arguments are its `action` / `operation` as JSON.
    kind: str = "function"
    position: int = -1  # index in the message's `tool_calls` (Chat), where ids may repeat
    # What the call runs when that is more than `name` (the policy entry) tells: an MCP
    # server's tool, `mcp:<label>/<tool>`. A human approval is bound to it.
    target: str | None = None


@dataclass(slots=True)
class CallContext:
    """Who is asking and about what: the request facts rules may look at."""

    principal: str
    request_id: str
    route: str
    model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    # With auth on: the identity's groups and its credential's id (never the credential).
    groups: tuple[str, ...] = ()
    credential: str | None = None
    # The audit batch this request's latest file record goes out in (0: none): nothing of the
    # answer may reach the client before that batch is written (see Auditor.written).
    audit_batch: int = 0
    # The request's trace (hex), when tracing is on: audit records carry it.
    trace_id: str | None = None
    # The app's approval service (proxy.approvals.Approvals), None outside a server (explain,
    # policy tests, replay): a call that needs approval is then blocked. `started`: when the
    # request came in (monotonic), so a call held for approval keeps within its deadline.
    approvals: Any = None
    started: float = field(default_factory=time.monotonic)

    def request_vars(self) -> dict[str, Any]:
        return {"model": self.model or "", "metadata": self.metadata, "user": self.user or ""}
