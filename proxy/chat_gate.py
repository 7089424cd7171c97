"""Gating a streamed Chat Completion (`stream: true`) on the fly, without I/O.

Text passes through as the raw bytes the upstream sent. A tool call's deltas are held until its
arguments are complete (the next call starts, or `finish_reason` arrives), then the call is
decided and either emitted as one coalesced delta (contiguous `index` from 0; `id`, `type` and
`name` exactly once) or withheld. At `finish_reason` the response's fate is settled like the
non-streaming path: `error` ends the stream with an error event, `reprompt` asks the upstream
again and continues this same client stream, `strip` appends a notice. A stream that ends or
breaks while a call is held fails closed: the call is never emitted.

`ChatGate` is fed bytes and answers with effects (proxy.stream_effects); proxy.stream_loop
reads, writes, awaits and records for it. Plain text stays on fast paths that parse nothing:
whole reads of text events (`sse.raw_prefix`), events that cannot carry a call
(`sse.may_hold_call`), and the next piece of a held call's arguments (`argument_piece`).
"""

from __future__ import annotations

from typing import Any

import structlog

from proxy import chat, chat_pieces, reprompt, sse
from proxy.chat_finish import (
    chunk,
    error_passed,
    finish_reason,
    reprompt_body,
    round_content,
    stash_order,
)
from proxy.chat_held import ChoiceState, HeldCall, Reprompted, incomplete, meaningful
from proxy.errors import error_body
from proxy.forward import StreamFailed, event_object
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy
from proxy.rounds import Plan, Refusal
from proxy.stream_effects import (
    DONE,
    ENDED,
    Decide,
    Effect,
    Fail,
    GateSteps,
    Record,
    Refuse,
    Release,
    Reprompt,
    RepromptFailed,
    Send,
    Settle,
    Steps,
)
from proxy.toolcalls import CallContext
from proxy.usage import add_usage

log = structlog.get_logger("callgate.chat_stream")
ROUTE = "chat.completions"


class ChatGate(GateSteps):
    route: str = ROUTE

    def __init__(self, policy: Policy, body: dict[str, Any], ctx: CallContext) -> None:
        super().__init__()
        self.policy = policy
        self.body = body
        self.ctx = ctx
        self.round = 0
        self.single_choice = body.get("n") in (None, 1)
        self.splitter = sse.EventSplitter()
        self.choices: dict[int, ChoiceState] = {}
        self.envelope: dict[str, Any] | None = None  # id/created/model the client saw first
        self.text: list[bytes | str] = []  # this round's text: raw events, or extracted strings
        self.usage: dict[str, Any] | None = None  # summed over finished rounds
        self.draining = False  # reprompt decided: read the rest of this round, emit nothing
        self.ended = False  # the client stream is over (an error event, or strip's ending)
        self.reprompt_plan: Plan | None = None
        self.reprompt_calls: list[HeldCall] = []
        self.reprompt_at: tuple[dict[str, Any], int] = ({}, 0)  # finishing chunk, choice index
        self.pending = None  # a Reprompted (typed in GateSteps): asked again, nothing sent yet
        self.any_text = False  # the client got text in an earlier round
        # With an error-mode tool in the policy, allowed calls wait for the response's fate:
        # a request that fails must not have sent any of its calls (their slots are refunded).
        self.defer_calls = policy.has_error_mode
        # Calls whose arguments are complete, decided together at the end of the read (one
        # store round trip for all of them), and what the client gets after the first of them,
        # held in order with each call in its place until then.
        self.undecided: list[tuple[HeldCall, dict[str, Any], int, ChoiceState]] = []
        self.deciding: list[tuple[HeldCall, dict[str, Any], int, ChoiceState]] = []  # asked
        # (A comment held is a one-tuple: sent past write(), as it answers no reprompt.)
        self.held: list[bytes | HeldCall | tuple[bytes]] = []
        # The fast path for a held call's next argument pieces (proxy.chat_pieces), and how
        # many more tries at learning one this stream may make (each call's first piece is
        # one: too early to learn from).
        self.template: chat_pieces.Template | None = None
        self.lessons = 6

    @property
    def holding(self) -> bool:
        """A call is in flight: every event is read, so a malformed one fails it closed."""
        for st in self.choices.values():  # (a loop: cheaper than any() on the hot path)
            if st.open:
                return True
        return False

    # -- the gate's surface (proxy.stream_effects.Gate) -----------------------------------

    def feed(self, data: bytes) -> list[Effect]:
        if not self.round and not self.draining and not self.splitter.pending and not self.holding:
            # The fast path: whole events of text go on untouched.
            cut = sse.raw_prefix(data)
            if cut:
                if cut == len(data):
                    self.text.append(data)
                    return [Send(data)]
                head = data[:cut]
                self.text.append(head)
                self.send(head)  # one write with what the rest of the read adds
                data = data[cut:]
        events = self.splitter.feed(data)
        for at, event in enumerate(events):
            over = self.event(event)
            if over is False:
                continue
            if over is True:
                self.emit(DONE)  # the stream is over, or this round is
            else:
                # A slow path: a generator, for the questions it may ask. Only here, as one
                # costs more than the common event's whole handling.
                self.step(self.events(over, events, at + 1))
            break
        return self.take()

    def next_round(self) -> list[Effect]:
        if self.reprompt_plan is None:
            self.reprompt_answered()
        else:
            self.reprompt(self.reprompt_plan)
        return self.take()

    def reprompt_failed(self, message: str, code: str, status: str) -> list[Effect]:
        self.strip_finish(message, code, status)
        return self.take()

    def disconnected(self) -> list[Effect]:
        # The client left mid-stream: what was decided is still recorded.
        self.drop_waiting()
        self.settle_unfinished(
            "the client disconnected", "client_disconnected", "client_disconnected"
        )
        return [e for e in self.take() if type(e) is not Send]

    # -- output ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.undecided:
            self.held.append(data)  # after a call not yet decided: in order, once it is
        else:
            super().write(data)

    def settle_unfinished(self, message: str, code: str, action: str = "fail_closed") -> None:
        """The stream ends early: record every decided call once, drop held ones (closed), and
        give back the reservations of allowed calls the client never received."""
        self.reprompt_answered()
        # Complete, never decided (or the decision cut off): never sent.
        for call, _, _, _ in [*self.deciding, *self.undecided]:
            d = Decision(call.tool_call(), self.policy.for_tool(call.name).name, "error")
            d.block = Block("stream", code, message)
            self.emit(Record(d, "blocked", action))
        self.deciding = []
        self.undecided.clear()
        self.held.clear()
        unsent: list[Decision] = []
        for st in self.choices.values():
            if not st.finished:
                # Decided but unsettled calls: record what happened to each.
                for call, d in zip(st.calls, st.decisions, strict=True):
                    sent = d.allowed and not any(call is c for c in st.deferred)
                    if d.allowed and not sent:
                        d.block = Block("stream", code, message)  # decided, never sent
                        unsent.append(d)
                    self.emit(Record(d, "allowed" if sent else "blocked", action))
            for call in st.open.values():
                d = Decision(call.tool_call(), self.policy.for_tool(call.name).name, "error")
                d.block = Block("stream", code, message)
                self.emit(Record(d, "blocked", action))
            st.open.clear()
            st.finished = True
            st.deferred.clear()
        if unsent:
            self.emit(Release(unsent))

    def on_failed(self, message: str, code: str) -> None:
        """The upstream stream cannot go on. After a reprompt that has not answered yet, the
        stream ends as `strip` would have ended the round before; otherwise it fails closed."""
        if self.pending is not None:
            self.strip_finish(message, code, reprompt.label(code))
            return
        # Drop every held call, tell the client, record why.
        self.settle_unfinished(message, code)
        self.ended = True
        event = b"data: " + error_body(message, "upstream_error", code) + b"\n\n"
        self.emit(Fail(message, code, event))

    # -- the events -----------------------------------------------------------------------

    def read_events(self, first: Steps, events: list[bytes], at: int) -> Steps:
        yield from first
        for event in events[at:]:
            if self.ended:
                break
            over = self.event(event)
            if over is True:
                break
            if over is not False:
                yield from over
        else:
            yield from self.decide_held()  # the read is over: its complete calls, together
            if not self.ended:
                return
        self.emit(DONE)  # the stream is over, or this round is

    def upstream_ended(self) -> Steps:
        rest = self.splitter.rest()
        if rest.strip():
            over = self.event(rest + b"\n\n")
            if over is not True and over is not False:
                yield from over
                yield from self.decide_held()
                over = False
            if over or self.ended:
                self.emit(DONE)
                return
        if not self.draining:
            if incomplete(self.choices):
                raise StreamFailed(
                    "upstream stream ended before the tool call's arguments were complete",
                    "incomplete_tool_call",
                )
            if not self.choices or not all(st.finished for st in self.choices.values()):
                error = error_passed(self.text)
                if error is not None:
                    # The upstream's error event ended the stream, and the client has it: as
                    # when a call is held (error_event), no error of callgate's follows it.
                    log.warning("upstream_error_event", error=str(error)[:300])
                    self.emit(DONE)
                    return
                raise StreamFailed(
                    "upstream stream ended before the response finished", "upstream_truncated"
                )
        self.emit(DONE)

    def event(self, event: bytes) -> bool | Steps:
        """Handle one complete event: True when the stream is over (or this round is), False
        when it was handled in place, or the slow path to run."""
        template = self.template
        if template is not None and not self.draining and template.take(event):
            return False  # the next piece of a held call's arguments (proxy.chat_pieces)
        payload = sse.data_of(event)
        if payload is None:
            if not self.draining:
                # Comments, keep-alives, other fields: queued past write(), as they answer
                # nothing (a failing reprompt round may still end the stream as strip would).
                if self.undecided:
                    self.held.append((event,))
                else:
                    self.send(event)
            return False
        if payload == sse.DONE:
            self.done(event)
            return True
        if (
            not self.round
            and not self.draining
            and not self.holding
            and not sse.may_hold_call(payload)
        ):
            self.text.append(event)
            self.write(event)
            return False
        return self.decoded(event, event_object(payload), template is None)

    def decoded(self, event: bytes, obj: dict[str, Any], learn: bool) -> bool | Steps:
        """`event` (decoded as `obj`) that may carry a call, a finish or an error."""
        if "error" in obj and "choices" not in obj:
            if self.undecided:
                return self.error_after_held(obj, event)
            self.error_event(obj, event)
            return True
        if self.argument_piece(obj):
            if learn and self.lessons:
                self.template = chat_pieces.learn(event, obj, self.choices)
                self.lessons -= self.template is None
            return False
        self.template = None  # the calls' state may change from here on
        if not self.round and not self.draining and self.untouched(obj):
            # A finish with no tool call in play (a plain text answer): nothing to rewrite.
            for choice in obj.get("choices") or []:
                self.choices.setdefault(choice.get("index", 0), ChoiceState()).finished = True
            self.write(event)
            return False
        return self.handle_chunk(obj)

    def done(self, event: bytes) -> None:
        """`[DONE]`: the round is over, and no call may be left half-streamed."""
        if incomplete(self.choices):
            raise StreamFailed(
                "upstream stream ended before the tool call's arguments were complete",
                "incomplete_tool_call",
            )
        if not self.draining:
            self.write(event)

    def error_event(self, obj: dict[str, Any], event: bytes) -> None:
        """The upstream's error event ends the stream: as strip would have, while a reprompt
        is unanswered; otherwise it passes through once every held call is dropped."""
        if self.pending is not None:
            message = "the upstream sent an error event: " + str(obj.get("error"))[:300]
            self.strip_finish(message, "upstream_error", "error_event")
            return
        self.settle_unfinished("the upstream sent an error event", "upstream_error")
        log.warning("upstream_error_event", error=str(obj.get("error"))[:300])
        self.write(event)  # the upstream's own error event passes through

    def error_after_held(self, obj: dict[str, Any], event: bytes) -> Steps:
        """An error event after calls this read completed: they are decided and go on first,
        as they would have had the error come in a later read."""
        yield from self.decide_held()
        self.error_event(obj, event)
        self.ended = True

    def argument_piece(self, obj: dict[str, Any]) -> bool:
        """The event most of a call's stream is made of: the next piece of an open call's
        arguments and nothing else. Taken in place (True), before the general path."""
        choices = obj.get("choices")
        if self.draining or type(choices) is not list or len(choices) != 1:
            return False
        choice = choices[0]
        if type(choice) is not dict or obj.get("usage") is not None:
            return False
        st = self.choices.get(choice.get("index", 0))
        return (
            st is not None
            and bool(st.open)
            and chat_pieces.next_arguments(st, choice, choice.get("delta"))
        )

    def untouched(self, obj: dict[str, Any]) -> bool:
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                return False
            delta = choice.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call"):
                return False
            st = self.choices.get(choice.get("index", 0))
            if st is not None and (st.open or st.calls):
                return False
        return True

    def handle_chunk(self, obj: dict[str, Any]) -> Steps:
        if self.draining:
            self.usage = add_usage(self.usage, obj.get("usage"))
            return
        if self.round and self.envelope:
            obj.update(self.envelope)  # a reprompt continues the stream the client already has
            if isinstance(obj.get("usage"), dict):
                obj["usage"] = add_usage(add_usage(None, self.usage), obj["usage"])
        elif self.envelope is None:
            self.envelope = {k: obj[k] for k in ("id", "created", "model") if k in obj}
        out: list[bytes] = []
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            self.write(sse.encode(obj))  # usage-only chunk (include_usage)
            return
        for choice in choices:
            if isinstance(choice, dict) and not self.ended:
                yield from self.handle_choice(obj, choice, out)
        if self.ended:
            return
        for data in out:
            self.write(data)

    def handle_choice(self, obj: dict[str, Any], choice: dict[str, Any], out: list[bytes]) -> Steps:
        ci = choice.get("index", 0)
        st = self.choices.setdefault(ci, ChoiceState())
        raw_delta = choice.get("delta")
        if st.open and chat_pieces.next_arguments(st, choice, raw_delta):
            return
        delta = dict(raw_delta) if isinstance(raw_delta, dict) else {}
        call_deltas = delta.pop("tool_calls", None)
        legacy = delta.pop("function_call", None)
        if self.round:
            delta.pop("role", None)  # the client already has the role; SDKs concatenate repeats
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        finish = choice.get("finish_reason")
        rest = {k: v for k, v in choice.items() if k not in ("delta", "finish_reason")}
        if meaningful(delta) or (rest.get("logprobs") not in (None, {})):
            out.append(chunk(obj, {**rest, "delta": delta, "finish_reason": None}))

        if isinstance(call_deltas, list) and call_deltas:
            st.saw_tool_calls = True
            for cd in call_deltas:
                if not isinstance(cd, dict):
                    continue
                idx = cd.get("index", 0)
                if idx not in st.open:
                    # A new call starts: every other open call's arguments are complete.
                    for other in sorted(st.open):
                        self.complete(obj, ci, st, st.open.pop(other), out)
                    st.open[idx] = HeldCall(index=idx)
                st.open[idx].add(cd)
        elif isinstance(legacy, dict) and not st.saw_tool_calls:
            # Legacy `functions` streaming. llama.cpp mirrors tool_calls here: ignored then.
            held = st.open.get(-1)
            if held is None:
                held = st.open[-1] = HeldCall(index=-1, id=chat.LEGACY_ID, legacy=True)
            held.add(legacy)

        if finish:
            yield from self.finish(obj, ci, st, choice, str(finish), out)

    def complete(
        self, obj: dict[str, Any], ci: int, st: ChoiceState, call: HeldCall, out: list[bytes]
    ) -> None:
        """A call's arguments are complete: what came before it goes on, and the call waits in
        its place to be decided with the others of this read (decide_held)."""
        for data in out:
            self.write(data)
        out.clear()
        self.undecided.append((call, obj, ci, st))
        self.held.append(call)

    def decide_held(self) -> Steps:
        """Decide the complete calls (one question, so one store round trip), then pass on
        what was held: each allowed call's chunk in its place, on record first (audit before
        delivery), unless the response's fate must come first (defer_calls)."""
        if not self.undecided:
            return
        undecided, self.undecided = self.undecided, []
        self.deciding = undecided
        decisions: list[Decision] = yield Decide([u[0].tool_call() for u in undecided])
        self.deciding = []
        chunks: dict[int, bytes] = {}
        for (call, obj, ci, st), decision in zip(undecided, decisions, strict=True):
            st.calls.append(call)
            st.decisions.append(decision)
            if decision.allowed:
                if self.defer_calls:
                    st.deferred.append(call)
                else:
                    self.emit(Record(decision, "allowed", None))
                    chunks[id(call)] = self.call_chunk(obj, ci, st, call)
        held, self.held = self.held, []
        for item in held:
            if isinstance(item, HeldCall):
                if id(item) in chunks:
                    self.write(chunks[id(item)])
            elif isinstance(item, tuple):
                self.send(item[0])
            else:
                self.write(item)

    def call_chunk(self, obj: dict[str, Any], ci: int, st: ChoiceState, call: HeldCall) -> bytes:
        if call.legacy:
            delta: dict[str, Any] = {
                "function_call": {"name": call.name, "arguments": call.arguments}
            }
        else:
            entry = {"index": st.emitted, **call.wire()}
            delta = {"tool_calls": [entry]}
            st.emitted += 1
        return chunk(obj, {"index": ci, "delta": delta, "logprobs": None, "finish_reason": None})

    def finish(
        self,
        obj: dict[str, Any],
        ci: int,
        st: ChoiceState,
        choice: dict[str, Any],
        finish: str,
        out: list[bytes],
    ) -> Steps:
        for other in sorted(st.open):  # the choice is over: its open calls are complete
            self.complete(obj, ci, st, st.open.pop(other), out)
        yield from self.decide_held()  # its calls and any other choice's, before it settles
        st.finished = True
        if not st.decisions:
            out.append(
                chunk(obj, {**choice, "delta": {}, "finish_reason": finish}, keep_usage=True)
            )
            return
        can_reprompt = self.single_choice and self.round < self.policy.config.max_reprompts
        p: Plan = yield Settle(st.decisions, can_reprompt)
        if p.action == "error":
            refusal: Refusal = yield Refuse(p)
            self.refused(refusal, out)
        elif p.action == "reprompt":
            st.deferred.clear()
            self.reprompt_plan = p
            self.reprompt_calls = list(st.calls)
            self.reprompt_at = (obj, ci)
            self.usage = add_usage(self.usage, obj.get("usage"))
            self.draining = True
        else:
            self.settled(obj, ci, st, choice, finish, p, out)

    def refused(self, refusal: Refusal, out: list[bytes]) -> None:
        """The round fails the request: what is queued, then the error event; no call."""
        for data in out:
            self.write(data)
        out.clear()
        error = error_body(refusal.message, refusal.type, refusal.code)
        self.write(b"data: " + error + b"\n\n")
        self.ended = True

    def settled(
        self,
        obj: dict[str, Any],
        ci: int,
        st: ChoiceState,
        choice: dict[str, Any],
        finish: str,
        p: Plan,
        out: list[bytes],
    ) -> None:
        """A choice whose calls were let through or removed: the deferred ones go now, then
        strip's notice, the stash order, the finishing chunk."""
        for call in st.deferred:
            out.append(self.call_chunk(obj, ci, st, call))
        st.deferred.clear()
        if p.action == "strip":
            text = chat.notice(p.blocked)
            sep = "\n\n" if round_content(self.text) else ""
            delta = {"content": sep + text}
            out.append(
                chunk(obj, {"index": ci, "delta": delta, "logprobs": None, "finish_reason": None})
            )
        order = stash_order(self.policy, self.ctx, st, p)
        if order is not None:
            self.emit(order)
        new_finish = finish_reason(st, p, finish)
        out.append(
            chunk(obj, {**choice, "delta": {}, "finish_reason": new_finish}, keep_usage=True)
        )

    # -- reprompt -------------------------------------------------------------------------

    def reprompt(self, p: Plan) -> None:
        """Start the next round: its body, asked of the upstream by the loop."""
        content = round_content(self.text)
        self.any_text = self.any_text or bool(content)
        self.body = reprompt_body(self.policy, self.body, self.reprompt_calls, content, p)
        self.round += 1
        self.choices.clear()
        self.text = []
        self.draining = False
        self.reprompt_plan = None
        self.splitter = sse.EventSplitter()
        self.reprompt_answered()  # the round before answered, with calls blocked again
        self.pending = Reprompted(p.blocked, *self.reprompt_at)
        self.emit(Reprompt(self.body, self.round, len(p.blocked)))

    def strip_finish(self, message: str, code: str, status: str) -> None:
        """The reprompt round failed upstream before it sent anything: end the client's
        stream as `strip` would have ended the round before (the notice, a normal finish),
        not with an error event."""
        pending, self.pending = self.pending, None
        assert pending is not None
        self.emit(RepromptFailed(pending.blocked, status))
        self.settle_unfinished(message, code)  # anything the failed round had decided
        template, ci = pending.template, pending.index
        text = ("\n\n" if self.any_text else "") + chat.notice(pending.blocked)
        for choice in (
            {"index": ci, "delta": {"content": text}, "logprobs": None, "finish_reason": None},
            {"index": ci, "delta": {}, "logprobs": None, "finish_reason": "stop"},
        ):
            self.write(chunk(template, choice))
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") and self.usage:
            head = {k: v for k, v in template.items() if k != "choices"}
            self.write(sse.encode({**head, "choices": [], "usage": self.usage}))
        self.write(b"data: [DONE]\n\n")
        self.ended = True
        self.emit(ENDED)
