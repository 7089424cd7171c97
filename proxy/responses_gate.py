"""Gating a streamed Response (`POST /v1/responses`, `stream: true`) on the fly, without I/O.

Events that cannot concern a tool call (text deltas and the like) pass as the raw bytes the
upstream sent; only events whose bytes name an output item, call arguments, or a lifecycle
event are decoded. A call the client runs (function, custom, shell, local shell, apply patch)
is held from `response.output_item.added` to `response.output_item.done`, then decided and
either released (its events, in order: argument deltas, shell command events, ...) or dropped;
every event naming its `output_index` meanwhile is held with it. A reasoning item is held
until its following item is known, and dropped with it. Everything behind a held item waits,
so the client sees the upstream's order (proxy.responses_items).

Once anything was dropped or added, every event after it is renumbered (proxy.responses_wire).
`response.completed` (and `.incomplete` / `.failed`), whose `output` repeats every item, is
rewritten so a blocked call never leaks there.

At the end of a round the response's fate is settled like the non-streaming path: `error`
ends the stream with an `error` event, `reprompt` asks the upstream again and continues this
same client stream (same response id), `strip` appends a notice message. When some tool's
`on_block` is `error`, allowed calls are held until the round is settled too, so a request
that fails has sent none of its calls (and their slots are given back).

A round that ends unsettled (a stream that breaks, an upstream `error` event or
`response.failed`, a client that leaves) fails closed: every decided call is recorded once,
and a call the client did not receive is recorded as blocked, its slot given back, never sent.

`ResponsesGate` is fed bytes and answers with effects (proxy.stream_effects); proxy.stream_loop
reads, writes, awaits and records for it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from proxy import reprompt, responses, sse
from proxy.forward import StreamFailed, event_object
from proxy.gates.decision import Decision
from proxy.responses_items import (
    DROP,
    ITEM_EVENTS,
    KEEP,
    LIFECYCLE,
    MAX_APPROVAL_ROUNDS,
    PENDING,
    ROUTE,
    TERMINAL,
    Ev,
    Item,
    Reprompted,
    approval_calls,
    error_message,
    log,
)
from proxy.responses_rounds import ResponsesRounds
from proxy.responses_wire import may_matter, output_index
from proxy.rounds import Plan, Refusal
from proxy.stream_effects import (
    DONE,
    Ask,
    Decide,
    Effect,
    Record,
    Refuse,
    Send,
    Settle,
    Steps,
)
from proxy.usage import add_usage

Handled = Generator[Ask, Any, bool]  # a slow path: True when this round's stream is over


class ResponsesGate(ResponsesRounds):
    route = ROUTE

    # -- the gate's surface (proxy.stream_effects.Gate) -----------------------------------

    def feed(self, data: bytes) -> list[Effect]:
        if (
            not self.renumber
            and not self.finished
            and not self.buffer
            and not self.splitter.pending
            and data.endswith(b"\n\n")
            and not may_matter(data)
        ):
            if self.pending is None:  # the fast path: text, untouched
                if b'"sequence_number"' in data:
                    self.last_out = data
                return [Send(data)]
            self.write(self.numbered(data))
            return self.take()
        events = self.splitter.feed(data)
        for at, event in enumerate(events):
            over = self.event(event)
            if over is False:
                if not self.ended:
                    continue
            elif over is not True:
                # A slow path (a generator, for the questions it may ask).
                self.step(self.events(over, events, at + 1))
                break
            self.emit(DONE)  # the stream is over, or this round is
            break
        return self.take()

    def next_round(self) -> list[Effect]:
        if self.asking is None or self.ended:
            self.reprompt_answered()
        else:
            self.reprompt(*self.asking)
        return self.take()

    def reprompt_failed(self, message: str, code: str, status: str) -> list[Effect]:
        if self.pending is not None:
            self.strip_finish(message, code, status)
        else:
            self.fail(message, code)
        return self.take()

    def disconnected(self) -> list[Effect]:
        # The client left (not the upstream's fault): what it did not receive is given back.
        self.drop_waiting()
        self.abandon("the client disconnected", "client_disconnected", "client_disconnected")
        return [e for e in self.take() if type(e) is not Send]

    def cancelled(self) -> list[Effect]:
        # Cancelled while the client is still there: a server shutting down.
        self.drop_waiting()
        self.abandon("the stream was cancelled", "cancelled", "cancelled")
        return [e for e in self.take() if type(e) is not Send]

    def crashed(self, exc: Exception) -> list[Effect] | None:
        self.drop_waiting()
        message = f"callgate could not process the upstream's stream ({type(exc).__name__})"
        self.fail(message + "; see its log", "internal_error", "server_error")
        return self.take()

    def on_failed(self, message: str, code: str) -> None:
        """The upstream stream cannot go on. After a reprompt that has not answered yet, the
        stream ends as `strip` would have ended the round before; otherwise it fails closed."""
        if self.pending is not None:
            self.strip_finish(message, code, reprompt.label(code))
        else:
            self.fail(message, code)

    # -- the events -----------------------------------------------------------------------

    def read_events(self, first: Handled, events: list[bytes], at: int) -> Steps:
        over = yield from first
        if not over and not self.ended:
            for event in events[at:]:
                handled = self.event(event)
                if handled is not True and handled is not False:
                    handled = yield from handled
                if handled or self.ended:
                    break
            else:
                yield from self.decide_held()  # the read is over: its done calls, together
                return
        self.emit(DONE)  # the stream is over, or this round is

    def upstream_ended(self) -> Steps:
        rest = self.splitter.rest()
        if rest.strip():
            over = self.event(rest + b"\n\n")
            if over is not True and over is not False:
                over = yield from over
            if over or self.ended:
                self.emit(DONE)
                return
        yield from self.decide_held()
        self.check_end()
        self.emit(DONE)

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

    def event(self, event: bytes) -> bool | Handled:
        """Handle one complete event: True when this round's stream is over, False when it was
        handled in place, or the slow path to run."""
        payload = sse.data_of(event)
        if payload is None:
            # Comments, keep-alives: no number, no order to keep. They answer nothing (a
            # failing reprompt round may still end the stream as strip would): past write().
            self.send(event)
            return False
        if payload == sse.DONE:
            if self.undecided:
                return self.held_then(lambda: self.done_event(event))
            return self.done_event(event)
        if self.finished:
            # The response is settled and its terminal event sent: nothing may follow it.
            log.warning("upstream_event_after_end", bytes=len(event))
            return False
        if not self.buffer and not may_matter(event):
            self.pass_on(Ev(event, up=output_index(event) if self.renumber else None))
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
        return self.handle(ev)

    def handle(self, ev: Ev) -> bool | Handled:
        kind = ev.type or ""
        obj = ev.obj or {}
        if kind in LIFECYCLE:
            self.lifecycle(ev, obj)
            return False
        if kind in TERMINAL:
            return self.terminal(ev)
        if kind == "error" or ("error" in obj and "type" not in obj):
            if self.undecided:  # decided first, as they would have been in a read of their own
                return self.held_then(lambda: self.upstream_error(ev, obj))
            return self.upstream_error(ev, obj)
        if kind.startswith(ITEM_EVENTS):
            item, raw = self.item_of(ev, kind, obj)
            if kind == "response.output_item.done":
                if item.status == PENDING and item.kind in ("call", "approval"):
                    return self.item_done(ev, item, raw)
            elif raw or kind == "response.output_item.added":
                pass
            elif kind.endswith(".delta") and isinstance(obj.get("delta"), str):
                item.pieces.append(obj["delta"])
        self.buffer.append(ev)
        self.flush()
        return False

    def lifecycle(self, ev: Ev, obj: dict[str, Any]) -> None:
        """`response.created` / `.in_progress`: passed on in the first round only."""
        response = obj.get("response")
        if self.round:
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.round_data["id"] = response["id"]
            self.activate()  # the client already has these: swallowed
            return
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            self.visible_id = self.visible_id or response["id"]
        self.pass_on(ev)

    def done_event(self, event: bytes) -> bool:
        if self.finished and self.asking is None:
            self.write(event)
        self.check_end()
        return True

    def held_then(self, handle: Callable[[], bool]) -> Handled:
        """Decide the calls this read has done so far, then handle the event that ends it."""
        yield from self.decide_held()
        return handle()

    def upstream_error(self, ev: Ev, obj: dict[str, Any]) -> bool:
        """The upstream's error event ends the stream: as strip would have, while a reprompt
        is unanswered; otherwise it passes through once every call is recorded, and nothing
        held goes out."""
        if self.pending:
            message = f"the upstream sent an error event: {error_message(obj)}"
            self.strip_finish(message, "upstream_error", "error_event")
            return True
        message = error_message(obj)
        self.abandon(f"the upstream sent an error event: {message}", "upstream_error")
        log.warning("upstream_error_event", error=message)
        self.write(self.numbered(ev.raw))
        self.ended = True
        return True

    def item_done(self, ev: Ev, item: Item, done: dict[str, Any]) -> Handled:
        """A call (or an approval) is done: an approval is decided at once, a call with the
        others the read completes (decide_held); its event is held until then, or passed."""
        raw = {**item.added, **done}
        decision: Decision | None = None
        if item.kind == "approval":
            [decision] = yield Decide(approval_calls(self.policy, [raw]))
            self.approvals.append(decision)
            item.status = DROP
        elif responses.runs_upstream(raw):
            item.status = KEEP  # a hosted shell's call, known at `done`: it ran upstream
        else:
            self.undecided.append((item, raw))  # decided with the read's others (decide_held)
        if decision is not None:
            item.decision = decision
            item.call_id = decision.call.id
        self.buffer.append(ev)
        self.flush()
        return False

    # -- the end of a round ---------------------------------------------------------------

    def terminal(self, ev: Ev) -> Handled:
        yield from self.decide_held()  # the round's fate needs every done call's
        obj = ev.obj or {}
        kind = ev.type or ""
        response = self.terminal_response(kind, obj)
        output: list[Any] | None = response.get("output")
        if self.round:
            self.usage = add_usage(self.usage, response.get("usage"))
        if kind == "response.failed":
            if self.pending is None:
                return self.failed_round(obj, response, output)
            error = response.get("error")
            why = error.get("message") if isinstance(error, dict) else None
            self.strip_finish(f"the upstream response failed: {why}", "upstream_failed")
            return True
        cut = self.cut_off(kind)
        if output:
            yield from self.decide_unseen(output)

        can_reprompt = self.reprompts < self.policy.config.max_reprompts
        approvals, self.approvals = self.approvals, []
        decided, self.decisions = self.decisions, []
        p: Plan = yield Settle(decided, can_reprompt, approvals)
        if p.action == "error":
            # Nothing of this round's calls went out (held, see `hold_calls`): all given back.
            refusal: Refusal = yield Refuse(p, approvals)
            self.send(self.error_event(refusal.message, refusal.type, refusal.code))
            self.ended = True
            return True
        return self.round_settled(ev, response, output, p, cut, approvals, bool(decided))

    @staticmethod
    def terminal_response(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """A terminal event's response, which the gate can rewrite (or StreamFailed)."""
        response = obj.get("response")
        if not isinstance(response, dict):
            raise StreamFailed(f"upstream sent {kind} without its response", "upstream_malformed")
        problem = responses.malformed_output(response.get("output"))
        if problem is not None:
            raise StreamFailed(f"upstream sent {kind} where {problem}", "upstream_malformed")
        return response

    def cut_off(self, kind: str) -> list[Decision]:
        """The calls still pending at the end of a round (max_output_tokens): blocked and on
        record, never sent, nor put into `output`; the pending approvals dropped."""
        pending = [
            i for i in self.items.values() if i.kind in ("call", "approval") and i.status == PENDING
        ]
        if pending and kind == "response.completed":
            raise StreamFailed(
                "upstream completed the response with a tool call still incomplete",
                "incomplete_tool_call",
            )
        cut: list[Decision] = []
        for item in pending:
            if item.kind == "call":
                d = item.decision = self.blocked_now(
                    self.tool_call(item, item.added),
                    "incomplete_tool_call",
                    "the tool call was cut off",
                )
                self.emit(Record(d, "blocked", "fail_closed"))
                cut.append(d)
            item.status = DROP  # an approval unanswered: the upstream runs nothing without it
        return cut

    def round_settled(
        self,
        ev: Ev,
        response: dict[str, Any],
        output: list[Any] | None,
        p: Plan,
        cut: list[Decision],
        approvals: list[Decision],
        decided: bool,
    ) -> bool:
        """A round let through or rewritten: concluded (False), or asked again (True) with
        the blocked calls' errors and the approval answers."""
        self.settled = True
        self.flush_all()
        self.finished = True
        answers = [responses.approval_response(d) for d in approvals]
        if p.action == "reprompt" or (
            approvals and not decided and self.approval_rounds < MAX_APPROVAL_ROUNDS
        ):
            if not self.round:
                self.usage = add_usage(None, response.get("usage"))
            outputs = [responses.error_output(d) for d in [*p.blocked, *cut]] + answers
            self.asking = (outputs, p.action == "reprompt")
            self.round_data = response
            if p.action == "reprompt":
                self.reprompted = Reprompted(
                    ev, response, output, p, cut, approvals, answers, self.body, self.prefix,
                    self.round, self.round_items, self.round_data, self.usage,
                )  # fmt: skip
            return True
        self.conclude(ev, response, output, p, cut, approvals, answers)
        return False

    def decide_held(self) -> Steps:
        """Decide the calls done since the last time, with one question (one store round
        trip), then send what waited for their fates."""
        if not self.undecided:
            return
        undecided, self.undecided = self.undecided, []
        decisions: list[Decision] = yield Decide([self.tool_call(i, raw) for i, raw in undecided])
        for (item, _), decision in zip(undecided, decisions, strict=True):
            self.decisions.append(decision)
            item.status = KEEP if decision.allowed else DROP
            item.decision = decision
            item.call_id = decision.call.id
        self.flush()

    def decide_unseen(self, output: list[Any]) -> Steps:
        """Gate the calls (and approval requests) a terminal event's `output` carries that no
        item event announced: the client's SDK builds its final response from that output."""
        calls = self.unseen(output)
        for call in calls:
            log.warning("unannounced_tool_call", call_id=call.id, tool=call.name)
        if calls:
            self.decisions += yield Decide(calls)
        items = self.unseen_approvals(output)
        if items:
            self.approvals += yield Decide(approval_calls(self.policy, items))
