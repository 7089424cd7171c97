"""A Chat Completions tool call as a stream gate holds it while its deltas arrive, and the
held calls of one choice; and a round asked again (what strip answers if it fails)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.gates.decision import Decision
from proxy.toolcalls import ToolCall


@dataclass(slots=True)
class HeldCall:
    index: int
    id: str = ""
    type: str = "function"
    name: str = ""
    args: list[str] = field(default_factory=list)
    legacy: bool = False

    def add(self, delta: dict[str, Any]) -> None:
        if delta.get("id") and not self.id:
            self.id = str(delta["id"])
        if delta.get("type"):
            self.type = str(delta["type"])
        inner = delta.get("custom") if self.type == "custom" else delta.get("function", delta)
        if not isinstance(inner, dict):
            return
        name = inner.get("name")
        # Servers like llama.cpp repeat the full name in every delta: keep it once.
        if name and name != self.name:
            self.name = name if not self.name else self.name + name
        piece = inner.get("input" if self.type == "custom" else "arguments")
        if isinstance(piece, str):
            self.args.append(piece)

    @property
    def arguments(self) -> str:
        return "".join(self.args)

    def tool_call(self) -> ToolCall:
        kind = "custom" if self.type == "custom" else "function"
        return ToolCall(self.id, self.name, self.arguments, kind)

    def wire(self) -> dict[str, Any]:
        """The call as a complete (non-streamed) `tool_calls` entry."""
        if self.type == "custom":
            return {
                "id": self.id,
                "type": "custom",
                "custom": {"name": self.name, "input": self.arguments},
            }
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class ChoiceState:
    open: dict[int, HeldCall] = field(default_factory=dict)
    calls: list[HeldCall] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    emitted: int = 0
    deferred: list[HeldCall] = field(default_factory=list)  # allowed, sent once settled
    saw_tool_calls: bool = False
    finished: bool = False


@dataclass(slots=True)
class Reprompted:
    """A round the upstream is being asked again about, until the next round sends something:
    what `strip` answers for it if that round fails upstream."""

    blocked: list[Decision]
    template: dict[str, Any]  # the round's finishing chunk (id, created, model, ...)
    index: int  # its choice index


def meaningful(delta: dict[str, Any]) -> bool:
    """Whether a delta says anything (an empty role-less delta is dropped)."""
    return any(v not in (None, "", [], {}) for v in delta.values())


def incomplete(choices: dict[int, ChoiceState]) -> bool:
    """A call is still streaming in, or decided calls await their choice's finish."""
    return any(st.open or (st.calls and not st.finished) for st in choices.values())
