"""Gating a streamed Response (`POST /v1/responses`, `stream: true`) on the fly.

Events that cannot concern a tool call (text deltas and the like) pass as the raw bytes the
upstream sent; only events whose bytes name an output item, call arguments, or a lifecycle
event are decoded. A function or custom tool call is held from `response.output_item.added`
to `response.output_item.done`, then decided and either released (its events, in order) or
dropped. A reasoning item is held until its following item is known, and dropped with it.
Everything behind a held item waits, so the client sees the upstream's order.

Once anything was dropped or added, every event after it is renumbered: `sequence_number`
stays contiguous and `output_index` unique and contiguous (a byte-level patch of the two fields
for raw events). `response.completed` (and `.incomplete` / `.failed`), whose `output` repeats
every item, is rewritten so a blocked call never leaks there.

At the end of a round the response's fate is settled like the non-streaming path: `error`
ends the stream with an `error` event, `reprompt` asks the upstream again and continues this
same client stream (same response id), `strip` appends a notice message. A stream that ends or
breaks while a call is held fails closed: the call is never emitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from proxy import responses, sse, stash
from proxy.blocking import Plan, audit_plan, plan
from proxy.gates import decide, release
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy
from proxy.state import AppState
from proxy.streaming import open_round
from proxy.toolcalls import CallContext, ToolCall

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

PENDING, KEEP, DROP = "pending", "keep", "drop"
MAX_APPROVAL_ROUNDS = 8  # upstream rounds spent answering MCP approval requests, per request


async def decide_approvals(
    state: AppState, policy: Policy, ctx: CallContext, items: list[dict[str, Any]]
) -> list[Decision]:
    """Run the gates on the calls MCP approval requests ask for, in order."""
    return [
        await decide(responses.approval_call(policy, item), policy, state.store, ctx)
        for item in items
    ]


async def save_entry(
    state: AppState, policy: Policy, response_id: str, value: dict[str, Any], body: dict[str, Any]
) -> None:
    """Stash a response's entry under its id and its surviving calls' ids; the outputs its
    conversation's next turn needs, under the conversation's id."""
    if not value:
        return
    ttl = policy.config.server.stash_ttl
    keys = [stash.responses_key(response_id)]
    keys += [responses.call_key(c) for c in value.get("calls", [])]
    await stash.put(state.store, keys, value, ttl)
    conversation = responses.conversation_id(body)
    if conversation:
        # The new outputs, or none: those this request carried are in the conversation now.
        outputs = value.get("outputs")
        key = responses.conversation_key(conversation)
        await stash.put(state.store, [key], {"outputs": outputs} if outputs else {}, ttl)


def settle_approvals(state: AppState, ctx: CallContext, p: Plan, approvals: list[Decision]) -> Plan:
    """Audit the approval decisions; a blocked one whose mode is `error` fails the response."""
    fail = p.action == "error" or any(not d.allowed and d.on_block == "error" for d in approvals)
    if fail and p.action != "error":
        p = Plan("error", p.allowed, p.blocked)
    for d in approvals:
        if fail:
            state.auditor.record(d, ctx, "blocked" if d.block else "withheld", "error")
        else:
            state.auditor.record(
                d, ctx, "allowed" if d.allowed else "blocked", "approve" if d.allowed else "deny"
            )
    return p


def may_matter(data: bytes) -> bool:
    return any(marker in data for marker in _MATTERS)


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


class StreamFailed(Exception):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _kind(item: Any, gated: set[str], hold_reasoning: bool) -> str:
    if isinstance(item, dict):
        if item.get("type") in responses.CALL_TYPES:
            return "call"
        if item.get("type") == "reasoning" and hold_reasoning:
            return "reasoning"
        if item.get("type") == responses.APPROVAL and item.get("server_label") in gated:
            return "approval"  # callgate answers it: the client never sees it
    return "other"


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

    @property
    def holding(self) -> bool:
        return bool(self.buffer)

    # -- output ---------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        await self.out.write(data)

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
        if ev.type == "response.output_item.done" and ev.obj is not None:
            item = ev.obj.get("item")
            if item is not None:
                self.round_items.append(item)
        await self.emit_raw(ev.raw)

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
            await self.write(b"event: error\n" + data)
        except (ConnectionResetError, RuntimeError):
            pass
        self.ended = True

    async def fail(self, message: str, code: str) -> None:
        """Fail closed: drop every held call, tell the client, record why."""
        self.record_unsettled("fail_closed", message, code)
        log.warning("stream_failed", code=code, error=message)
        await self.send_error(message, "upstream_error", code)

    def record_unsettled(self, action: str, message: str, code: str) -> None:
        for d in self.decisions:
            self.state.auditor.record(d, self.ctx, "allowed" if d.allowed else "blocked", action)
        self.decisions = []
        for item in self.items.values():
            if item.kind == "call" and item.status == PENDING:
                call = self.tool_call(item, item.added)
                d = Decision(call, self.policy.for_tool(call.name).name, "error")
                d.block = Block("stream", code, message)
                self.state.auditor.record(d, self.ctx, "blocked", action)
                item.status = DROP

    # -- the loop -------------------------------------------------------------------------

    async def run(self, resp: aiohttp.ClientResponse) -> None:
        while True:
            try:
                await self.pump(resp)
            except StreamFailed as exc:
                await self.fail(str(exc), exc.code)
                return
            finally:
                resp.close()  # a no-op once read to the end; cancels the upstream otherwise
            if self.next_round is None or self.ended:
                return
            next_resp = await self.reprompt(*self.next_round)
            if next_resp is None:
                return
            resp = next_resp

    async def pump(self, resp: aiohttp.ClientResponse) -> None:
        splitter = sse.EventSplitter()
        try:
            async for data in resp.content.iter_any():
                if (
                    not self.renumber
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
        except ConnectionResetError:
            raise  # the client left (aiohttp's reset error is also a ClientConnectionError)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise StreamFailed(
                f"upstream disconnected mid-stream: {exc}", "upstream_disconnected"
            ) from None
        except TimeoutError:
            raise StreamFailed("upstream stream timed out", "upstream_timeout") from None
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
            await self.write(event)  # comments, keep-alives: no number, no order to keep
            return False
        if payload == sse.DONE:
            if self.finished and self.next_round is None:
                await self.write(event)
            self.check_end()
            return True
        if not self.holding and not may_matter(event):
            match = _INDEX.search(event) if self.renumber else None
            await self.emit(Ev(event, up=int(match.group(1)) if match else None))
            return False
        # Decoded: it may concern a call, or a call is held (a malformed event fails it closed).
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise StreamFailed(
                f"upstream sent a malformed stream event: {exc}", "upstream_malformed"
            ) from None
        if not isinstance(obj, dict):
            raise StreamFailed(
                "upstream sent a stream event that is not a JSON object", "upstream_malformed"
            )
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
        if kind == "error" or ("error" in obj and "type" not in obj):
            # The upstream's own error event passes through; nothing held goes out.
            self.record_unsettled(
                "fail_closed", str(obj.get("message") or "upstream error"), "upstream_error"
            )
            await self.emit_raw(ev.raw)
            self.ended = True
            return True
        if kind == "response.output_item.added" and ev.up is not None:
            added = obj.get("item")
            item = Item(
                ev.up,
                _kind(added, self.gated, self.hold_reasoning),
                added=added if isinstance(added, dict) else {},
            )
            if item.kind == "other":
                item.status = KEEP
            if self.last_added is not None and self.last_added in self.items:
                self.items[self.last_added].follower = ev.up
            self.items[ev.up] = item
            self.last_added = ev.up
        elif kind.startswith(_ARG_EVENTS) and kind.endswith(".delta"):
            item = self.items.get(ev.up) if ev.up is not None else None
            if item is not None and isinstance(obj.get("delta"), str):
                item.pieces.append(obj["delta"])
        elif kind == "response.output_item.done" and ev.up is not None:
            item = self.items.get(ev.up)
            if item is not None and item.kind == "call" and item.status == PENDING:
                done = obj.get("item") if isinstance(obj.get("item"), dict) else {}
                decision = await decide(
                    self.tool_call(item, {**item.added, **done}),
                    self.policy,
                    self.state.store,
                    self.ctx,
                )
                self.decisions.append(decision)
                item.status = KEEP if decision.allowed else DROP
            elif item is not None and item.kind == "approval" and item.status == PENDING:
                done = obj.get("item") if isinstance(obj.get("item"), dict) else {}
                self.approvals += await decide_approvals(
                    self.state, self.policy, self.ctx, [{**item.added, **done}]
                )
                item.status = DROP
        self.buffer.append(ev)
        await self.flush()
        return False

    def tool_call(self, item: Item, raw: dict[str, Any]) -> ToolCall:
        field_name = "input" if raw.get("type") == "custom_tool_call" else "arguments"
        if not isinstance(raw.get(field_name), str) or (not raw[field_name] and item.pieces):
            raw = {**raw, field_name: "".join(item.pieces)}
        call = responses.call_of(raw)
        assert call is not None
        return call

    def status(self, up: int) -> str:
        seen = set()
        item = self.items.get(up)
        while item is not None and item.kind == "reasoning" and item.status == PENDING:
            if item.follower is None or item.follower in seen:
                return PENDING
            seen.add(item.follower)
            item = self.items.get(item.follower)
        return KEEP if item is None else item.status

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
            self.buffer.pop(0)
            await self.emit(ev)

    # -- the end of a round ---------------------------------------------------------------

    async def terminal(self, ev: Ev) -> bool:
        obj = ev.obj or {}
        kind = ev.type
        response = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        pending = [
            i for i in self.items.values() if i.kind in ("call", "approval") and i.status == PENDING
        ]
        if pending and kind == "response.completed":
            raise StreamFailed(
                "upstream completed the response with a tool call still incomplete",
                "incomplete_tool_call",
            )
        if pending:
            # Cut off mid-call (max_output_tokens, a failure): such a call never goes out.
            for item in pending:
                if item.kind == "approval":
                    item.status = DROP  # unanswered: the upstream runs nothing without approval
                    continue
                call = self.tool_call(item, item.added)
                d = Decision(call, self.policy.for_tool(call.name).name, "error")
                d.block = Block("stream", "incomplete_tool_call", "the tool call was cut off")
                self.state.auditor.record(d, self.ctx, "blocked", "fail_closed")
                item.status = DROP
        for item in self.items.values():
            if (
                item.kind == "reasoning"
                and item.status == PENDING
                and self.status(item.up) == PENDING
            ):
                item.status = KEEP  # the last item: nothing follows it
        await self.flush()
        self.finished = True
        output = response.get("output") if isinstance(response.get("output"), list) else []
        if self.round:
            self.usage = responses.add_usage(self.usage, response.get("usage"))
        can_reprompt = (
            kind != "response.failed" and self.reprompts < self.policy.config.max_reprompts
        )
        p = plan(self.decisions, can_reprompt)
        approvals, self.approvals = self.approvals, []
        p = settle_approvals(self.state, self.ctx, p, approvals)
        if self.decisions:
            audit_plan(self.state.auditor, p, self.ctx)
        decided, self.decisions = self.decisions, []
        if p.action == "error":
            await release(self.state.store, [*p.allowed, *(d for d in approvals if d.allowed)])
            first = next(d for d in [*p.blocked, *approvals] if not d.allowed)
            assert first.block is not None
            message = f"Tool call {first.call.name!r} blocked by callgate: {first.block.message}"
            await self.send_error(message, "tool_call_blocked", first.block.gate)
            return True
        answers = [responses.approval_response(d) for d in approvals]
        if kind != "response.failed" and (
            p.action == "reprompt"
            or (approvals and not decided and self.approval_rounds < MAX_APPROVAL_ROUNDS)
        ):
            if not self.round:
                self.usage = responses.add_usage(None, response.get("usage"))
            outputs = [responses.error_output(d) for d in p.blocked] + answers
            self.next_round = (outputs, p.action == "reprompt")
            self.round_data = response
            return True

        blocked_ids = {d.call.id for d in [*p.blocked, *approvals]}
        if not output:
            output = list(self.round_items)  # a terminal event without the items: as streamed
        kept, groups, removed = responses.split_output(output, blocked_ids)
        extra: dict[str, Any] = {}
        if p.action == "strip" and kind != "response.failed":
            after_text = responses.has_text(self.prefix) or responses.has_text(kept)
            note = responses.notice_item(responses.notice_text(p.blocked, after_text))
            await self.send_notice(note)
            kept.append(note)
            extra["extra"] = [note]
        changed = bool(self.round or p.blocked or approvals)
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
        if changed or self.renumber:
            await self.write(self.encode(obj))
        else:
            await self.emit_raw(ev.raw)
        if kind == "response.failed":
            self.ended = True
        await self.save(p, response, groups, removed, extra, answers)
        return kind == "response.failed"

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
        value = responses.entry(hide=[*self.inserted, *removed], **extra)
        if self.visible_id:
            await save_entry(self.state, self.policy, self.visible_id, value, self.body)

    # -- reprompt -------------------------------------------------------------------------

    async def reprompt(
        self, outputs: list[dict[str, Any]], is_reprompt: bool
    ) -> aiohttp.ClientResponse | None:
        """Ask the upstream again (blocked calls' errors, approval answers); same client stream."""
        self.body = responses.next_round_body(self.body, self.round_data, outputs)
        self.prefix = [*self.prefix, *self.round_items]
        self.round += 1
        if is_reprompt:
            self.reprompts += 1
            self.state.metrics.reprompts.labels("responses").inc()
        else:
            self.approval_rounds += 1
        self.next_round = None
        self.round_data = {}
        self.reset_round()
        self.activate()
        log.info("reprompt", round=self.round, outputs=len(outputs), stream=True)
        resp, message, code = await open_round(self.state, self.request, self.body)
        if resp is None:
            await self.fail(message, code)
        return resp
