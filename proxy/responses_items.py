"""The output items of a Responses stream's round, as far as gating cares (proxy.responses_gate).

A call the client runs is held from `response.output_item.added` to `.done`, then decided and
kept or dropped; a reasoning item waits for the item that follows it and shares its fate; an
MCP approval request of a gated server is answered by callgate and never shown. Plain
bookkeeping: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy import responses
from proxy.forward import StreamFailed
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy
from proxy.rounds import Plan
from proxy.toolcalls import ToolCall

log = structlog.get_logger("callgate.responses_stream")

ROUTE = "responses"
PENDING, KEEP, DROP = "pending", "keep", "drop"
MAX_APPROVAL_ROUNDS = 8  # upstream rounds spent answering MCP approval requests, per request
LIFECYCLE = ("response.created", "response.in_progress", "response.queued")
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
ITEM_EVENTS = (
    "response.output_item.",
    "response.function_call_arguments.",
    "response.custom_tool_call_input.",
)


def approval_calls(policy: Policy, items: list[dict[str, Any]]) -> list[ToolCall]:
    """The calls MCP approval requests ask for, for the gates to decide in order.

    A server whose policy has `approval` is escalated to a person like any tool (the approval
    gate): the answer is `approve: false` with the approval id until a person approves, then
    the model's identical request passes once. The grant is bound to the server's tool too
    (`target`), not only to the policy entry, which may cover all of the server's tools.
    """
    calls = []
    for item in items:
        call = responses.approval_call(policy, item)
        call.target = f"mcp:{item.get('server_label', '')}/{item.get('name', '')}"
        calls.append(call)
    return calls


def error_message(obj: dict[str, Any]) -> str:
    """The message of an upstream `error` event (flat, or under `error`)."""
    error = obj.get("error")
    message = obj.get("message")
    if not message and isinstance(error, dict):
        message = error.get("message")
    return str(message or "no message")[:500]


@dataclass(slots=True)
class Ev:
    raw: bytes
    type: str | None = None
    obj: dict[str, Any] | None = None
    up: int | None = None  # the upstream's output_index


@dataclass(slots=True)
class Item:
    """An upstream output item of this round, as far as gating cares."""

    up: int
    kind: str  # "call" | "reasoning" | "approval" | "other"
    status: str = PENDING
    follower: int | None = None  # the next item's up index (for reasoning)
    pieces: list[str] = field(default_factory=list)  # streamed arguments / input
    added: dict[str, Any] = field(default_factory=dict)
    call_id: str | None = None  # calls: the call id; approvals: the request's item id
    decision: Decision | None = None
    sent: bool = False  # its `output_item.done` reached the client


@dataclass(slots=True)
class Reprompted:
    """A round the upstream is being asked again about, until the next round sends something:
    its end, as `strip` would have settled it, is what the client gets if that round fails."""

    ev: Ev  # the round's terminal event (not sent)
    response: dict[str, Any]
    output: list[Any] | None
    plan: Plan
    cut: list[Decision]
    approvals: list[Decision]
    answers: list[dict[str, Any]]
    # The stream's state at the end of that round, restored to settle it.
    body: dict[str, Any]
    prefix: list[Any]
    round: int
    round_items: list[Any]
    round_data: dict[str, Any]
    usage: dict[str, Any] | None

    @property
    def blocked(self) -> list[Decision]:
        return self.plan.blocked


def _kind(item: dict[str, Any], gated: set[str], hold_reasoning: bool) -> str:
    kind = responses.type_of(item)
    if kind in responses.CALL_TYPES and not responses.runs_upstream(item):
        return "call"
    if kind == "reasoning" and hold_reasoning:
        return "reasoning"
    label = item.get("server_label")
    if kind == responses.APPROVAL and isinstance(label, str) and label in gated:
        return "approval"  # callgate answers it: the client never sees it
    return "other"


def _retyped(added: dict[str, Any], done: dict[str, Any]) -> bool:
    """Does `output_item.done` give an item another type than its `added` did? (A call must
    stay a call: one that turned into one at `done` was never held.)"""
    before, after = responses.type_of(added), responses.type_of(done)
    if after is None or before == after:
        return False
    return before is not None or after in responses.CALL_TYPES or after == responses.APPROVAL


def _item_id(item: dict[str, Any], kind: str) -> str | None:
    if kind == "call":
        return str(item.get("call_id") or item.get("id") or "")
    if kind == "approval":
        return str(item.get("id", ""))
    return None


class ItemBook:
    """This round's items: what each is, when its fate is known."""

    policy: Policy
    gated: set[str]
    hold_reasoning: bool
    hold_calls: bool  # allowed calls wait for the round's settlement (error mode)
    settled: bool  # this round's plan is made: held allowed calls may go out
    round_items: list[Any]  # items the client saw this round (output_item.done)

    def reset_items(self) -> None:
        self.items: dict[int, Item] = {}
        self.last_added: int | None = None

    def item_of(self, ev: Ev, kind: str, obj: dict[str, Any]) -> tuple[Item, dict[str, Any]]:
        """The item an item event names, announced now if new; with its `item` (the raw
        item of `added` / `done`, else empty). A malformed event fails the stream."""
        if ev.up is None:
            raise StreamFailed(
                f"upstream sent {kind} without an output_index", "upstream_malformed"
            )
        item = self.items.get(ev.up)
        if kind not in ("response.output_item.added", "response.output_item.done"):
            if item is None:
                raise StreamFailed(
                    f"upstream sent {kind} for an item it never announced", "upstream_malformed"
                )
            return item, {}
        raw = obj.get("item")
        problem = responses.malformed_item(raw)
        if problem is not None:
            raise StreamFailed(f"upstream sent {kind} where {problem}", "upstream_malformed")
        assert isinstance(raw, dict)
        if kind == "response.output_item.added" and item is not None:
            raise StreamFailed(
                f"upstream announced output_index {ev.up} twice", "upstream_malformed"
            )
        if item is None:  # announced now (an upstream may skip `added`)
            item = self.add_item(ev.up, raw)
        elif _retyped(item.added, raw):
            raise StreamFailed(
                f"upstream changed the type of output item {ev.up}", "upstream_malformed"
            )
        return item, raw

    def add_item(self, up: int, raw: dict[str, Any]) -> Item:
        kind = _kind(raw, self.gated, self.hold_reasoning)
        item = Item(up, kind, added=raw, call_id=_item_id(raw, kind))
        if item.kind == "other":
            item.status = KEEP
        if self.last_added is not None and self.last_added in self.items:
            self.items[self.last_added].follower = up
        self.items[up] = item
        self.last_added = up
        return item

    def tool_call(self, item: Item, raw: dict[str, Any]) -> ToolCall:
        raw = {**raw, "type": item.added.get("type")}  # a call stays the kind it was announced as
        if raw["type"] in responses.NAMED_CALL_TYPES:
            field_name = "input" if raw["type"] == "custom_tool_call" else "arguments"
            if not isinstance(raw.get(field_name), str) or (not raw[field_name] and item.pieces):
                raw = {**raw, field_name: "".join(item.pieces)}
        # Built-in tools' calls: `done` carries the whole action / operation (read from the
        # item, never from deltas; a missing one reads as no arguments, and a rule reading
        # them raises, which blocks).
        call = responses.read_call(raw)
        if call is None:  # not reached: an item of kind "call" has a call type
            raise StreamFailed(
                "upstream sent a tool call callgate cannot read", "upstream_malformed"
            )
        call.position = item.up  # where it sits in the round's output
        return call

    def blocked_now(self, call: ToolCall, code: str, message: str) -> Decision:
        d = Decision(call, self.policy.for_tool(call.name).name, "error")
        d.block = Block("stream", code, message)
        return d

    def status(self, up: int) -> str:
        seen = set()
        item = self.items.get(up)
        while item is not None and item.kind == "reasoning" and item.status == PENDING:
            if item.follower is None or item.follower in seen:
                return PENDING
            seen.add(item.follower)
            item = self.items.get(item.follower)
        if item is None:
            return KEEP
        if item.kind == "call" and item.status == KEEP and self.hold_calls and not self.settled:
            return PENDING  # allowed, held until the round is settled (error mode)
        return item.status

    def keep_last_reasoning(self) -> None:
        """A reasoning item that nothing follows is kept."""
        for item in self.items.values():
            if (
                item.kind == "reasoning"
                and item.status == PENDING
                and self.status(item.up) == PENDING
            ):
                item.status = KEEP  # the last item: nothing follows it

    def unseen(self, output: list[Any]) -> list[ToolCall]:
        """The calls of a terminal event's `output` that no item event of this round announced
        (matched by call id, or by item id)."""
        calls = {i.call_id for i in self.items.values() if i.kind == "call"}
        ids = {i.added.get("id") for i in self.items.values() if i.added.get("id")}
        out = []
        for call in responses.calls_of(output):
            item_id = output[call.position].get("id")
            if call.id in calls or (item_id and item_id in ids):
                continue
            calls.add(call.id)
            out.append(call)
        return out

    def unseen_approvals(self, output: list[Any]) -> list[dict[str, Any]]:
        seen = {i.call_id for i in self.items.values() if i.kind == "approval"}
        out = []
        for item in responses.approvals_of(output, self.gated):
            if str(item.get("id", "")) not in seen:
                seen.add(str(item.get("id", "")))
                out.append(item)
        return out

    def as_streamed(self, output: list[Any]) -> list[Any]:
        """The terminal event's `output` with each call the client received as it was streamed
        (and gated). SDKs build the final response from this `output`: a call repeated there
        with other arguments would reach the client ungated."""
        sent = {
            item["call_id"]: item
            for item in self.round_items
            if responses.type_of(item) in responses.CALL_TYPES
            and isinstance(item.get("call_id"), str)
        }
        if not sent:
            return output
        out = []
        for item in output:
            streamed = (
                sent.get(item.get("call_id"))
                if responses.type_of(item) in responses.CALL_TYPES
                else None
            )
            if streamed is not None and streamed != item:
                log.warning("terminal_call_differs", call_id=item.get("call_id"))
                item = streamed
            out.append(item)
        return out
