"""Gating a streamed Response (`POST /v1/responses`, `stream: true`) on the fly.

Events that cannot concern a tool call (text deltas and the like) pass as the raw bytes the
upstream sent; only events whose bytes name an output item, call arguments, or a lifecycle
event are decoded. A call the client runs (function, custom, shell, local shell, apply patch)
is held from `response.output_item.added` to `response.output_item.done`, then decided and
either released (its events, in order: argument deltas, shell command events, ...) or dropped;
every event naming its `output_index` meanwhile is held with it. A reasoning item is held
until its following item is known, and dropped with it. Everything behind a held item waits,
so the client sees the upstream's order.

Once anything was dropped or added, every event after it is renumbered: `sequence_number`
stays contiguous and `output_index` unique and contiguous (a byte-level patch of the two fields
for raw events). `response.completed` (and `.incomplete` / `.failed`), whose `output` repeats
every item, is rewritten so a blocked call never leaks there.

At the end of a round the response's fate is settled like the non-streaming path: `error`
ends the stream with an `error` event, `reprompt` asks the upstream again and continues this
same client stream (same response id), `strip` appends a notice message. When some tool's
`on_block` is `error`, allowed calls are held until the round is settled too, so a request
that fails has sent none of its calls (and their slots are given back).

A round that ends unsettled (a stream that breaks, an upstream `error` event or
`response.failed`, a client that leaves) fails closed: every decided call is recorded once,
and a call the client did not receive is recorded as blocked, its slot given back, never sent.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy import http1, reprompt, responses, sse, stash
from proxy.delivery import on_record
from proxy.forward import StreamFailed, event_object, next_chunk, open_round
from proxy.gates import decide, release
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy
from proxy.responses_stash import StashEntry
from proxy.rounds import Plan, asked_again, refuse, settle
from proxy.state import AppState
from proxy.toolcalls import CallContext, ToolCall
from proxy.usage import add_usage

log = structlog.get_logger("callgate.responses_stream")

_SEQ = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
_INDEX = re.compile(rb'"output_index"\s*:\s*(\d+)')
# Bytes that an event which matters for gating must contain (a false positive costs a parse).
_MATTERS = (
    b"response.output_item.",
    b"response.function_call_arguments.",
    b"response.custom_tool_call_input.",
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"response.created",
    b"response.in_progress",
    b"response.queued",
    b'"error"',
    sse.DONE,
)
_LIFECYCLE = ("response.created", "response.in_progress", "response.queued")
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_ARG_EVENTS = ("response.function_call_arguments.", "response.custom_tool_call_input.")

ROUTE = "responses"
PENDING, KEEP, DROP = "pending", "keep", "drop"
MAX_APPROVAL_ROUNDS = 8  # upstream rounds spent answering MCP approval requests, per request


async def decide_approvals(
    state: AppState, policy: Policy, ctx: CallContext, items: list[dict[str, Any]]
) -> list[Decision]:
    """Run the gates on the calls MCP approval requests ask for, in order.

    A server whose policy has `approval` is escalated to a person like any tool (the approval
    gate): the answer is `approve: false` with the approval id until a person approves, then
    the model's identical request passes once. The grant is bound to the server's tool too
    (`target`), not only to the policy entry, which may cover all of the server's tools.
    """
    decisions = []
    for item in items:
        call = responses.approval_call(policy, item)
        call.target = f"mcp:{item.get('server_label', '')}/{item.get('name', '')}"
        decisions.append(await decide(call, policy, state.store, ctx))
    return decisions


async def save_entry(
    state: AppState,
    policy: Policy,
    principal: str,
    response_id: str,
    entry: StashEntry,
    body: dict[str, Any],
) -> None:
    """Stash a response's entry under its id and its surviving calls' ids; the outputs its
    conversation's next turn needs, under the conversation's id."""
    value = entry.to_json()
    if not value:
        return
    ttl = policy.config.server.stash_ttl
    keys = [stash.responses_key(response_id)]
    keys += [responses.call_key(principal, c) for c in entry.calls]
    await stash.put(state.store, keys, value, ttl)
    conversation = responses.conversation_id(body)
    if conversation:
        # The new outputs, or none: those this request carried are in the conversation now.
        key = responses.conversation_key(conversation)
        await stash.put(state.store, [key], StashEntry(outputs=entry.outputs).to_json(), ttl)


def error_message(obj: dict[str, Any]) -> str:
    """The message of an upstream `error` event (flat, or under `error`)."""
    error = obj.get("error")
    message = obj.get("message")
    if not message and isinstance(error, dict):
        message = error.get("message")
    return str(message or "no message")[:500]


def may_matter(data: bytes) -> bool:
    return any(marker in data for marker in _MATTERS)


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
    kind: str  # "call" | "reasoning" | "other"
    status: str = PENDING
    follower: int | None = None  # the next item's up index (for reasoning)
    pieces: list[str] = field(default_factory=list)  # streamed arguments / input
    added: dict[str, Any] = field(default_factory=dict)
    call_id: str | None = None  # calls: the call id; approvals: the request's item id
    decision: Decision | None = None
    sent: bool = False  # its `output_item.done` reached the client


_ITEM_EVENTS = ("response.output_item.", *_ARG_EVENTS)


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


class ResponsesStream:
    def __init__(
        self,
        request: web.Request,
        out: web.StreamResponse,
        state: AppState,
        policy: Policy,
        body: dict[str, Any],
        ctx: CallContext,
        inserted: list[str] | None = None,
        gated: set[str] | None = None,
    ) -> None:
        self.request = request
        self.out = out
        self.state = state
        self.policy = policy
        self.body = body
        self.ctx = ctx
        self.inserted = list(inserted or [])
        self.gated = set(gated or ())
        # Reasoning is held until its following item is known, in case that one is dropped:
        # needless (and it delays reasoning summaries) when no item can be dropped.
        self.hold_reasoning = (
            bool(self.gated)
            or "prompt" in body  # a stored prompt may bring tools of its own
            or responses.has_client_tools(body)
        )
        # With an error-mode tool in the policy, allowed calls wait for the round's fate: a
        # request that fails must not have sent any of its calls (their slots are given back).
        self.hold_calls = policy.has_error_mode
        client_prev = body.get("previous_response_id")
        self.client_prev = client_prev if isinstance(client_prev, str) else None
        self.round = 0
        self.reprompts = 0
        self.approval_rounds = 0
        # Output: renumbering starts with the first event dropped, added or swallowed.
        self.renumber = False
        self.next_seq = 0
        self.last_out: bytes | None = None  # last raw bytes sent that carry a sequence_number
        self.next_index = 0
        self.event_lines = False  # the upstream names events (`event: ...` lines): we do too
        self.visible_id: str | None = None  # the response id the client sees (first round's)
        self.prefix: list[Any] = []  # items the client saw in earlier rounds
        self.usage: dict[str, Any] | None = None  # summed over finished rounds
        self.ended = False  # the client stream is over (error sent, or failure passed on)
        self.finished = False  # this round's terminal event arrived
        # Set when this round ends by asking the upstream again: (outputs to send, is a reprompt).
        self.next_round: tuple[list[dict[str, Any]], bool] | None = None
        self.round_data: dict[str, Any] = {}
        self.reprompted: Reprompted | None = None  # this round's end, if it asks again
        self.pending: Reprompted | None = None  # asked again; the next round sent nothing yet
        self.reset_round()

    def reset_round(self) -> None:
        self.items: dict[int, Item] = {}
        self.index_map: dict[int, int] = {}
        self.last_added: int | None = None
        self.buffer: list[Ev] = []
        self.decisions: list[Decision] = []
        self.approvals: list[Decision] = []
        self.round_items: list[Any] = []  # items the client saw this round (output_item.done)
        self.finished = False
        self.settled = False  # this round's plan is made: held allowed calls may go out

    @property
    def holding(self) -> bool:
        return bool(self.buffer)

    # -- output ---------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self.pending is not None:
            self.reprompt_answered()  # the round answers: no strip fallback from here on
        if self.state.auditor.unwritten(self.ctx):
            await on_record(self.state, self.ctx)  # audit before delivery
        await self.out.write(data)

    def reprompt_answered(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            reprompt.asked(self.state, self.ctx, pending.plan.blocked)

    def activate(self) -> None:
        """From here on, number every event we send ourselves."""
        if self.renumber:
            return
        self.renumber = True
        if self.last_out is not None:
            found = _SEQ.findall(self.last_out)
            if found:
                self.next_seq = int(found[-1]) + 1

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def client_index(self, up: int) -> int:
        index = self.index_map.get(up)
        if index is None:
            if self.renumber:
                index = self.next_index
            else:
                index = up
            self.index_map[up] = index
            self.next_index = max(self.next_index, index + 1)
        return index

    async def emit_raw(self, data: bytes) -> None:
        """Send raw bytes of one or more events that are not held and carry no new item."""
        if not self.renumber:
            if b'"sequence_number"' in data:
                self.last_out = data
            await self.write(data)
            return
        await self.write(self.patch(data))

    def patch(self, data: bytes) -> bytes:
        data = _SEQ.sub(lambda _: b'"sequence_number":%d' % self.take_seq(), data)

        def index(m: re.Match[bytes]) -> bytes:
            return b'"output_index":%d' % self.client_index(int(m.group(1)))

        return _INDEX.sub(index, data)

    async def emit(self, ev: Ev) -> None:
        if ev.type == "response.output_item.added" and ev.up is not None:
            self.client_index(ev.up)
        await self.emit_raw(ev.raw)
        if ev.type == "response.output_item.done" and ev.obj is not None:
            item = ev.obj.get("item")
            if item is not None:
                self.round_items.append(item)
            held = self.items.get(ev.up) if ev.up is not None else None
            if held is not None:
                held.sent = True

    def encode(self, obj: dict[str, Any]) -> bytes:
        if self.renumber:
            obj["sequence_number"] = self.take_seq()
        data = b"data: " + orjson.dumps(obj) + b"\n\n"
        if self.event_lines and isinstance(obj.get("type"), str):
            data = b"event: " + obj["type"].encode() + b"\n" + data
        return data

    async def send_error(self, message: str, type_: str, code: str) -> None:
        """The Responses streaming `error` event, as OpenAI sends it (the SDKs raise APIError)."""
        self.activate()
        error = {"type": type_, "code": code, "message": message, "param": None}
        obj = {
            "type": "error",
            "sequence_number": self.take_seq(),
            "code": code,
            "message": message,
            "param": None,
            "error": error,
        }
        data = b"data: " + orjson.dumps(obj) + b"\n\n"
        try:
            await self.out.write(b"event: error\n" + data)  # carries no call: no audit wait
        except (ConnectionResetError, RuntimeError):
            pass
        self.ended = True

    async def fail(self, message: str, code: str, type_: str = "upstream_error") -> None:
        """Fail closed: drop every held call, tell the client, record why."""
        await self.abandon(message, code)
        log.warning("stream_failed", code=code, error=message)
        await self.send_error(message, type_, code)

    def blocked_now(self, call: ToolCall, code: str, message: str) -> Decision:
        d = Decision(call, self.policy.for_tool(call.name).name, "error")
        d.block = Block("stream", code, message)
        return d

    async def abandon(
        self, message: str, code: str, action: str = "fail_closed"
    ) -> tuple[list[Decision], list[Decision]]:
        """The round ends unsettled: record every call once, and fail closed on what the client
        has not received (recorded as blocked, slot given back, never sent).

        Returns (calls the client received, calls it did not: each with a block)."""
        self.reprompt_answered()
        decided = {id(d) for d in self.decisions}
        delivered: list[Decision] = []
        withheld: list[Decision] = []
        refund: list[Decision] = []
        for item in self.items.values():
            if item.kind != "call":
                continue
            d = item.decision
            if d is None and item.status == PENDING:
                d = item.decision = self.blocked_now(
                    self.tool_call(item, item.added), code, message
                )
            elif d is None or id(d) not in decided:
                continue  # settled already
            if d.allowed and item.sent:
                self.state.auditor.record(d, self.ctx, "allowed", action)
                delivered.append(d)
                continue
            if d.allowed:
                refund.append(d)
                d.block = Block("stream", code, message)
            self.state.auditor.record(d, self.ctx, "blocked", action)
            item.status = DROP
            withheld.append(d)
        for d in self.approvals:  # never answered: the upstream runs nothing
            if d.allowed:
                refund.append(d)
                d.block = Block("stream", code, message)
            self.state.auditor.record(d, self.ctx, "blocked", action)
        self.decisions = []
        self.approvals = []
        for item in self.items.values():
            if item.kind == "approval":
                item.status = DROP
        await release(self.state.store, refund)
        return delivered, withheld

    # -- the loop -------------------------------------------------------------------------

    async def run(self, resp: http1.Response) -> None:
        try:
            await self.rounds(resp)
        except ConnectionError:
            # The client left (aiohttp's reset error is a ConnectionResetError): not the
            # upstream's fault. What it did not receive is given back.
            await self.abandon(
                "the client disconnected", "client_disconnected", "client_disconnected"
            )
            raise
        except asyncio.CancelledError:
            # A server with handler cancellation cancels on a client disconnect; else shutdown.
            transport = self.request.transport
            if transport is None or transport.is_closing():
                await self.abandon(
                    "the client disconnected", "client_disconnected", "client_disconnected"
                )
            else:
                await self.abandon("the stream was cancelled", "cancelled", "cancelled")
            raise
        except Exception as exc:
            log.exception("stream_gate_error")
            message = f"callgate could not process the upstream's stream ({type(exc).__name__})"
            try:
                await self.fail(message + "; see its log", "internal_error", "server_error")
            except Exception:
                log.exception("stream_gate_error_unrecorded")

    async def rounds(self, resp: http1.Response) -> None:
        while True:
            try:
                await self.pump(resp)
            except StreamFailed as exc:
                if self.pending is not None:
                    await self.strip_finish(str(exc), exc.code, reprompt.label(exc.code))
                else:
                    await self.fail(str(exc), exc.code)
                return
            finally:
                resp.close()  # a no-op once read to the end; cancels the upstream otherwise
            if self.next_round is None or self.ended:
                self.reprompt_answered()
                return
            next_resp = await self.reprompt(*self.next_round)
            if next_resp is None:
                return
            resp = next_resp

    async def pump(self, resp: http1.Response) -> None:
        splitter = sse.EventSplitter()
        while (data := await next_chunk(resp)) is not None:
            if (
                not self.renumber
                and not self.finished
                and not self.holding
                and not splitter.pending
                and data.endswith(b"\n\n")
                and not may_matter(data)
            ):
                await self.emit_raw(data)  # the fast path: text, untouched
                continue
            for event in splitter.feed(data):
                if await self.event(event) or self.ended:
                    return
        rest = splitter.rest()
        if rest.strip() and (await self.event(rest + b"\n\n") or self.ended):
            return
        self.check_end()

    def check_end(self) -> None:
        if self.finished or self.ended:
            return
        if any(i.kind == "call" and i.status == PENDING for i in self.items.values()):
            raise StreamFailed(
                "upstream stream ended before the tool call was complete", "incomplete_tool_call"
            )
        raise StreamFailed(
            "upstream stream ended before the response finished", "upstream_truncated"
        )

    async def event(self, event: bytes) -> bool:
        """Handle one complete event. True when this round's stream is over."""
        payload = sse.data_of(event)
        if payload is None:
            # Comments, keep-alives: no number, no order to keep. They answer nothing (a
            # failing reprompt round may still end the stream as strip would): past write().
            await self.out.write(event)
            return False
        if payload == sse.DONE:
            if self.finished and self.next_round is None:
                await self.write(event)
            self.check_end()
            return True
        if self.finished:
            # The response is settled and its terminal event sent: nothing may follow it.
            log.warning("upstream_event_after_end", bytes=len(event))
            return False
        if not self.holding and not may_matter(event):
            match = _INDEX.search(event) if self.renumber else None
            await self.emit(Ev(event, up=int(match.group(1)) if match else None))
            return False
        # Decoded: it may concern a call, or a call is held (a malformed event fails it closed).
        obj = event_object(payload)
        if event.startswith(b"event:"):
            self.event_lines = True
        kind = obj.get("type")
        up = obj.get("output_index")
        ev = Ev(
            event, kind if isinstance(kind, str) else None, obj, up if isinstance(up, int) else None
        )
        return await self.handle(ev)

    async def handle(self, ev: Ev) -> bool:
        kind = ev.type or ""
        obj = ev.obj or {}
        if kind in _LIFECYCLE:
            response = obj.get("response")
            if self.round:
                if isinstance(response, dict) and isinstance(response.get("id"), str):
                    self.round_data["id"] = response["id"]
                self.activate()  # the client already has these: swallowed
                return False
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.visible_id = self.visible_id or response["id"]
            await self.emit(ev)
            return False
        if kind in _TERMINAL:
            return await self.terminal(ev)
        if (kind == "error" or ("error" in obj and "type" not in obj)) and self.pending:
            message = f"the upstream sent an error event: {error_message(obj)}"
            await self.strip_finish(message, "upstream_error", "error_event")
            return True
        if kind == "error" or ("error" in obj and "type" not in obj):
            # The upstream's own error event passes through, once every call is recorded;
            # nothing held goes out.
            message = error_message(obj)
            await self.abandon(f"the upstream sent an error event: {message}", "upstream_error")
            log.warning("upstream_error_event", error=message)
            await self.emit_raw(ev.raw)
            self.ended = True
            return True
        if kind.startswith(_ITEM_EVENTS):
            await self.item_event(ev, kind, obj)
        self.buffer.append(ev)
        await self.flush()
        return False

    async def item_event(self, ev: Ev, kind: str, obj: dict[str, Any]) -> None:
        """Track the items of this round; decide a call (or an approval) once it is done."""
        if ev.up is None:
            raise StreamFailed(
                f"upstream sent {kind} without an output_index", "upstream_malformed"
            )
        item = self.items.get(ev.up)
        if kind in ("response.output_item.added", "response.output_item.done"):
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
            if kind == "response.output_item.done":
                await self.item_done(item, raw)
            return
        if item is None:
            raise StreamFailed(
                f"upstream sent {kind} for an item it never announced", "upstream_malformed"
            )
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            item.pieces.append(obj["delta"])

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

    async def item_done(self, item: Item, done: dict[str, Any]) -> None:
        if item.status != PENDING or item.kind not in ("call", "approval"):
            return
        raw = {**item.added, **done}
        if item.kind == "approval":
            [decision] = await decide_approvals(self.state, self.policy, self.ctx, [raw])
            self.approvals.append(decision)
            item.status = DROP
        elif responses.runs_upstream(raw):
            item.status = KEEP  # a hosted shell's call, known at `done`: it ran upstream
            return
        else:
            call = self.tool_call(item, raw)
            decision = await decide(call, self.policy, self.state.store, self.ctx)
            self.decisions.append(decision)
            item.status = KEEP if decision.allowed else DROP
        item.decision = decision
        item.call_id = decision.call.id

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

    async def flush(self) -> None:
        """Send the held events whose item's fate is known, in order; stop at the first not."""
        while self.buffer:
            ev = self.buffer[0]
            if ev.up is not None and ev.up in self.items:
                st = self.status(ev.up)
                if st == PENDING:
                    return
                if st == DROP:
                    self.buffer.pop(0)
                    self.activate()
                    continue
                item = self.items[ev.up]
                d = item.decision
                if d is not None and not d.recorded and item.kind == "call":
                    # Sent before the round is settled: on record first (audit before delivery).
                    self.state.auditor.record(d, self.ctx, "allowed", None)
            self.buffer.pop(0)
            await self.emit(ev)

    # -- the end of a round ---------------------------------------------------------------

    async def terminal(self, ev: Ev) -> bool:
        obj = ev.obj or {}
        kind = ev.type or ""
        response = obj.get("response")
        if not isinstance(response, dict):
            raise StreamFailed(f"upstream sent {kind} without its response", "upstream_malformed")
        problem = responses.malformed_output(response.get("output"))
        if problem is not None:
            raise StreamFailed(f"upstream sent {kind} where {problem}", "upstream_malformed")
        output: list[Any] | None = response.get("output")
        if self.round:
            self.usage = add_usage(self.usage, response.get("usage"))
        if kind == "response.failed" and self.pending is not None:
            error = response.get("error")
            why = error.get("message") if isinstance(error, dict) else None
            await self.strip_finish(f"the upstream response failed: {why}", "upstream_failed")
            return True
        if kind == "response.failed":
            return await self.failed(obj, response, output)
        pending = [
            i for i in self.items.values() if i.kind in ("call", "approval") and i.status == PENDING
        ]
        if pending and kind == "response.completed":
            raise StreamFailed(
                "upstream completed the response with a tool call still incomplete",
                "incomplete_tool_call",
            )
        # Cut off mid-call (max_output_tokens): such a call never goes out, nor into `output`.
        cut: list[Decision] = []
        for item in pending:
            if item.kind == "call":
                d = item.decision = self.blocked_now(
                    self.tool_call(item, item.added),
                    "incomplete_tool_call",
                    "the tool call was cut off",
                )
                self.state.auditor.record(d, self.ctx, "blocked", "fail_closed")
                cut.append(d)
            item.status = DROP  # an approval unanswered: the upstream runs nothing without it
        if output:
            await self.decide_unseen(output)

        can_reprompt = self.reprompts < self.policy.config.max_reprompts
        approvals, self.approvals = self.approvals, []
        decided, self.decisions = self.decisions, []
        p = settle(self.state, self.ctx, decided, can_reprompt, approvals)
        if p.action == "error":
            # Nothing of this round's calls went out (held, see `hold_calls`): all given back.
            refusal = await refuse(self.state, p, approvals)
            await self.send_error(refusal.message, refusal.type, refusal.code)
            return True
        self.settled = True
        await self.flush_all()
        self.finished = True
        answers = [responses.approval_response(d) for d in approvals]
        if p.action == "reprompt" or (
            approvals and not decided and self.approval_rounds < MAX_APPROVAL_ROUNDS
        ):
            if not self.round:
                self.usage = add_usage(None, response.get("usage"))
            outputs = [responses.error_output(d) for d in [*p.blocked, *cut]] + answers
            self.next_round = (outputs, p.action == "reprompt")
            self.round_data = response
            if p.action == "reprompt":
                self.reprompted = Reprompted(
                    ev, response, output, p, cut, approvals, answers, self.body, self.prefix,
                    self.round, self.round_items, self.round_data, self.usage,
                )  # fmt: skip
            return True
        await self.conclude(ev, response, output, p, cut, approvals, answers)
        return False

    async def conclude(
        self,
        ev: Ev,
        response: dict[str, Any],
        output: list[Any] | None,
        p: Plan,
        cut: list[Decision],
        approvals: list[Decision],
        answers: list[dict[str, Any]],
    ) -> None:
        """Send the settled round's end: the notice (`strip`), the terminal event with the
        `output` the client saw; stash what the next turn needs."""
        restored = self.as_streamed(output) if output else None
        swapped = restored is not None and restored != output
        output = restored if restored is not None else list(self.round_items)
        withheld = [*p.blocked, *cut]
        kept, groups, removed = responses.split_output(
            output, responses.positions_of(output, withheld), {d.call.id for d in approvals}
        )
        extra: dict[str, Any] = {}
        if p.action == "strip":
            after_text = responses.has_text(self.prefix) or responses.has_text(kept)
            note = responses.notice_item(responses.notice_text(p.blocked, after_text))
            await self.send_notice(note)
            kept.append(note)
            extra["extra"] = [note]
        await self.send_terminal(ev, response, kept, bool(withheld or approvals or swapped))
        settled = Plan(p.action, p.allowed, withheld)
        await self.save(settled, response, groups, removed, extra, answers)

    async def strip_finish(self, message: str, code: str, status: str | None = None) -> None:
        """The reprompt round failed upstream before it sent anything: settle the round before
        it as `strip` would have (notice, its terminal event), not with an error event."""
        snap, self.pending = self.pending, None
        assert snap is not None
        reprompt.failed(
            self.state, self.ctx, ROUTE, snap.plan.blocked, status or reprompt.label(code)
        )
        await self.abandon(message, code)  # anything the failed round had decided
        self.body, self.prefix, self.round = snap.body, snap.prefix, snap.round
        self.round_items, self.round_data, self.usage = (
            snap.round_items,
            snap.round_data,
            snap.usage,
        )
        self.next_round = None
        p = Plan("strip", snap.plan.allowed, snap.plan.blocked)
        await self.conclude(
            snap.ev, snap.response, snap.output, p, snap.cut, snap.approvals, snap.answers
        )
        self.finished = self.ended = True

    async def failed(
        self, obj: dict[str, Any], response: dict[str, Any], output: list[Any] | None
    ) -> bool:
        """`response.failed`: the round ends unsettled. Calls the client has keep their place;
        every other call is recorded as blocked and left out of the failed response."""
        error = response.get("error")
        why = error.get("message") if isinstance(error, dict) else None
        message = "the upstream response failed" + (f": {str(why)[:300]}" if why else "")
        delivered, withheld = await self.abandon(message, "upstream_failed")
        for call in self.unseen(output or []):  # in the failed output only: never shown
            d = self.blocked_now(call, "upstream_failed", message)
            self.state.auditor.record(d, self.ctx, "blocked", "fail_closed")
            withheld.append(d)
        await self.flush_all()
        self.finished = self.ended = True
        approvals = {i.call_id for i in self.items.values() if i.kind == "approval" and i.call_id}
        approvals |= {str(i.get("id")) for i in responses.approvals_of(output, self.gated)}
        output = output if output else list(self.round_items)  # as streamed, if not given
        kept, groups, removed = responses.split_output(
            output, responses.positions_of(output, withheld), approvals
        )
        changed = len(kept) != len(output)
        await self.send_terminal(Ev(b"", "response.failed", obj), response, kept, changed)
        await self.save(Plan("fail_closed", delivered, withheld), response, groups, removed, {}, [])
        return True

    async def decide_unseen(self, output: list[Any]) -> None:
        """Gate the calls (and approval requests) a terminal event's `output` carries that no
        item event announced: the client's SDK builds its final response from that output."""
        for call in self.unseen(output):
            log.warning("unannounced_tool_call", call_id=call.id, tool=call.name)
            self.decisions.append(await decide(call, self.policy, self.state.store, self.ctx))
        seen = {i.call_id for i in self.items.values() if i.kind == "approval"}
        for item in responses.approvals_of(output, self.gated):
            if str(item.get("id", "")) not in seen:
                seen.add(str(item.get("id", "")))
                self.approvals += await decide_approvals(self.state, self.policy, self.ctx, [item])

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

    async def flush_all(self) -> None:
        """Send everything still held whose fate is known; a reasoning item that nothing
        follows is kept."""
        for item in self.items.values():
            if (
                item.kind == "reasoning"
                and item.status == PENDING
                and self.status(item.up) == PENDING
            ):
                item.status = KEEP  # the last item: nothing follows it
        await self.flush()

    async def send_terminal(
        self, ev: Ev, response: dict[str, Any], kept: list[Any], changed: bool
    ) -> None:
        """The round's terminal event, its `output` as the client saw the whole response."""
        obj = ev.obj or {}
        changed = changed or bool(self.round)
        if changed:
            response["output"] = [*self.prefix, *kept]
            if "output_text" in response:
                response["output_text"] = responses.output_text(response["output"])
        if self.round:
            if self.visible_id:
                response["id"] = self.visible_id
            if self.usage is not None:
                response["usage"] = self.usage
            if "previous_response_id" in response:
                response["previous_response_id"] = self.client_prev
        if changed or self.renumber or not ev.raw:
            await self.write(self.encode(obj))
        else:
            await self.emit_raw(ev.raw)

    async def send_notice(self, note: dict[str, Any]) -> None:
        """A complete message item, event by event, as the upstream would stream it."""
        self.activate()
        index = self.next_index
        self.next_index += 1
        item_id = note["id"]
        part = note["content"][0]
        text = part["text"]
        empty = {**part, "text": ""}
        common = {"item_id": item_id, "output_index": index, "content_index": 0}
        for obj in (
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": {**note, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **common, "part": empty},
            {"type": "response.output_text.delta", **common, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **common, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **common, "part": part},
            {"type": "response.output_item.done", "output_index": index, "item": note},
        ):
            await self.write(self.encode(obj))
        self.round_items.append(note)

    async def save(
        self,
        p: Plan,
        response: dict[str, Any],
        groups: list[dict[str, Any]],
        removed: list[str],
        extra: dict[str, Any],
        answers: list[dict[str, Any]],
    ) -> None:
        """Stash what the client's next turn and its reads of this response need."""
        stored = responses.stored(self.body, response)
        if self.round and stored and self.round_data.get("id"):
            final_id = self.round_data["id"]
            if final_id != self.visible_id:
                extra["target"] = final_id
                extra["prefix"] = self.prefix
        if p.blocked or answers:
            extra.update(
                outputs=[responses.error_output(d) for d in p.blocked] + answers,
                groups=groups,
                calls=[d.call.id for d in p.allowed],
            )
        entry = StashEntry(hide=[*self.inserted, *removed], **extra)
        if self.visible_id:
            await save_entry(
                self.state, self.policy, self.ctx.principal, self.visible_id, entry, self.body
            )

    # -- reprompt -------------------------------------------------------------------------

    async def reprompt(
        self, outputs: list[dict[str, Any]], is_reprompt: bool
    ) -> http1.Response | None:
        """Ask the upstream again (blocked calls' errors, approval answers); same client stream."""
        self.reprompt_answered()  # the round before answered, with calls blocked again
        if is_reprompt:
            self.pending, self.reprompted = self.reprompted, None
        self.body = responses.next_round_body(self.body, self.round_data, outputs)
        if is_reprompt and self.pending is not None:
            blocked = {d.call.name for d in self.pending.plan.blocked}
            relaxed = responses.relaxed_tool_choice(
                self.body, blocked, reprompt.denied(self.policy)
            )
            self.body.update(relaxed)
        self.prefix = [*self.prefix, *self.round_items]
        self.round += 1
        if is_reprompt:
            self.reprompts += 1
            asked_again(self.state, "responses", self.round, len(outputs), stream=True)
        else:
            self.approval_rounds += 1
            log.info("approval_round", round=self.round, outputs=len(outputs), stream=True)
        self.next_round = None
        self.round_data = {}
        self.reset_round()
        self.activate()
        resp, message, code, status = await open_round(
            self.state, self.request, self.body, self.policy.config.upstream
        )
        if resp is None and self.pending is not None:
            await self.strip_finish(message, code, str(status) if status is not None else None)
        elif resp is None:
            await self.fail(message, code)
        return resp
