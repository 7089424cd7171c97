"""The Responses stream gate's state and the ends of its rounds (proxy.responses_gate reads the
events): what the client gets when a round is settled (`conclude`: the notice, the terminal
event with the `output` the client saw, the stash entry), when it fails (`failed_round`,
`abandon`, `fail`), when a reprompt round fails before it answered (`strip_finish`), and the
next round's body (`reprompt`). No I/O: everything is an effect (proxy.stream_effects).
"""

from __future__ import annotations

from typing import Any

from proxy import reprompt, responses, sse
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy
from proxy.responses_items import DROP, PENDING, Ev, Item, ItemBook, Reprompted, log
from proxy.responses_stash import StashEntry, entry_puts
from proxy.responses_wire import Numbering
from proxy.rounds import Plan
from proxy.stream_effects import (
    ENDED,
    Fail,
    GateSteps,
    Record,
    Release,
    Reprompt,
    RepromptFailed,
    Stash,
)
from proxy.toolcalls import CallContext


class ResponsesRounds(GateSteps, Numbering, ItemBook):
    """A Responses stream's state across rounds, and how a round ends."""

    def __init__(
        self,
        policy: Policy,
        body: dict[str, Any],
        ctx: CallContext,
        inserted: list[str] | None = None,
        gated: set[str] | None = None,
    ) -> None:
        GateSteps.__init__(self)
        Numbering.__init__(self)
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
        self.visible_id: str | None = None  # the response id the client sees (first round's)
        self.prefix: list[Any] = []  # items the client saw in earlier rounds
        self.usage: dict[str, Any] | None = None  # summed over finished rounds
        self.ended = False  # the client stream is over (error sent, or failure passed on)
        # Set when this round ends by asking the upstream again: (outputs to send, is a reprompt).
        self.asking: tuple[list[dict[str, Any]], bool] | None = None
        self.round_data: dict[str, Any] = {}
        self.reprompted: Reprompted | None = None  # this round's end, if it asks again
        self.pending: Reprompted | None = None  # asked again; the next round sent nothing yet
        self.reset_round()

    def reset_round(self) -> None:
        self.reset_items()
        # Calls done in this read, decided together at its end (one store round trip); their
        # items stay pending, so the events after them wait in `buffer` until then.
        self.undecided: list[tuple[Item, dict[str, Any]]] = []
        self.index_map = {}
        self.splitter = sse.EventSplitter()
        self.buffer: list[Ev] = []
        self.decisions: list[Decision] = []
        self.approvals: list[Decision] = []
        self.round_items = []
        self.finished = False  # this round's terminal event arrived
        self.settled = False

    # -- output ---------------------------------------------------------------------------

    def pass_on(self, ev: Ev) -> None:
        """An event that is not held, as the client gets it."""
        if ev.type == "response.output_item.added" and ev.up is not None:
            self.client_index(ev.up)
        self.write(self.numbered(ev.raw))
        if ev.type == "response.output_item.done" and ev.obj is not None:
            item = ev.obj.get("item")
            if item is not None:
                self.round_items.append(item)
            held = self.items.get(ev.up) if ev.up is not None else None
            if held is not None:
                held.sent = True

    def fail(self, message: str, code: str, type_: str = "upstream_error") -> None:
        """Fail closed: drop every held call, tell the client, record why."""
        self.abandon(message, code)
        self.ended = True
        self.emit(Fail(message, code, self.error_event(message, type_, code)))

    def abandon(
        self, message: str, code: str, action: str = "fail_closed"
    ) -> tuple[list[Decision], list[Decision]]:
        """The round ends unsettled: record every call once, and fail closed on what the client
        has not received (recorded as blocked, slot given back, never sent).

        Returns (calls the client received, calls it did not: each with a block)."""
        self.reprompt_answered()
        done = {id(item): raw for item, raw in self.undecided}  # complete, never decided
        self.undecided = []
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
                    self.tool_call(item, done.get(id(item), item.added)), code, message
                )
            elif d is None or id(d) not in decided:
                continue  # settled already
            if d.allowed and item.sent:
                self.emit(Record(d, "allowed", action))
                delivered.append(d)
                continue
            if d.allowed:
                refund.append(d)
                d.block = Block("stream", code, message)
            self.emit(Record(d, "blocked", action))
            item.status = DROP
            withheld.append(d)
        for d in self.approvals:  # never answered: the upstream runs nothing
            if d.allowed:
                refund.append(d)
                d.block = Block("stream", code, message)
            self.emit(Record(d, "blocked", action))
        self.decisions = []
        self.approvals = []
        for item in self.items.values():
            if item.kind == "approval":
                item.status = DROP
        if refund:
            self.emit(Release(refund))
        return delivered, withheld

    def flush(self) -> None:
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
                    # Sent before the round is settled: on record first (audit before
                    # delivery; the auditor records a decision once).
                    self.emit(Record(d, "allowed", None))
            self.buffer.pop(0)
            self.pass_on(ev)

    def flush_all(self) -> None:
        """Send everything still held whose fate is known; a reasoning item that nothing
        follows is kept."""
        self.keep_last_reasoning()
        self.flush()

    # -- the end of a round ---------------------------------------------------------------

    def conclude(
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
            for data in self.notice_events(note):
                self.write(data)
            self.round_items.append(note)
            kept.append(note)
            extra["extra"] = [note]
        self.send_terminal(ev, response, kept, bool(withheld or approvals or swapped))
        settled = Plan(p.action, p.allowed, withheld)
        self.save(settled, response, groups, removed, extra, answers)

    def strip_finish(self, message: str, code: str, status: str | None = None) -> None:
        """The reprompt round failed upstream before it sent anything: settle the round before
        it as `strip` would have (notice, its terminal event), not with an error event."""
        snap, self.pending = self.pending, None
        assert snap is not None
        self.emit(RepromptFailed(snap.plan.blocked, status or reprompt.label(code)))
        self.abandon(message, code)  # anything the failed round had decided
        self.body, self.prefix, self.round = snap.body, snap.prefix, snap.round
        self.round_items, self.round_data, self.usage = (
            snap.round_items,
            snap.round_data,
            snap.usage,
        )
        self.asking = None
        p = Plan("strip", snap.plan.allowed, snap.plan.blocked)
        self.conclude(
            snap.ev, snap.response, snap.output, p, snap.cut, snap.approvals, snap.answers
        )
        self.finished = self.ended = True
        self.emit(ENDED)

    def failed_round(
        self, obj: dict[str, Any], response: dict[str, Any], output: list[Any] | None
    ) -> bool:
        """`response.failed`: the round ends unsettled. Calls the client has keep their place;
        every other call is recorded as blocked and left out of the failed response."""
        error = response.get("error")
        why = error.get("message") if isinstance(error, dict) else None
        message = "the upstream response failed" + (f": {str(why)[:300]}" if why else "")
        delivered, withheld = self.abandon(message, "upstream_failed")
        for call in self.unseen(output or []):  # in the failed output only: never shown
            d = self.blocked_now(call, "upstream_failed", message)
            self.emit(Record(d, "blocked", "fail_closed"))
            withheld.append(d)
        self.flush_all()
        self.finished = self.ended = True
        approvals = {i.call_id for i in self.items.values() if i.kind == "approval" and i.call_id}
        approvals |= {str(i.get("id")) for i in responses.approvals_of(output, self.gated)}
        output = output if output else list(self.round_items)  # as streamed, if not given
        kept, groups, removed = responses.split_output(
            output, responses.positions_of(output, withheld), approvals
        )
        changed = len(kept) != len(output)
        self.send_terminal(Ev(b"", "response.failed", obj), response, kept, changed)
        self.save(Plan("fail_closed", delivered, withheld), response, groups, removed, {}, [])
        return True

    def send_terminal(
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
            self.write(self.encode(obj))
        else:
            self.write(self.numbered(ev.raw))

    def save(
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
            ttl = self.policy.config.server.stash_ttl
            for keys, value in entry_puts(self.ctx.principal, self.visible_id, entry, self.body):
                self.emit(Stash(keys, value, ttl))

    # -- reprompt -------------------------------------------------------------------------

    def reprompt(self, outputs: list[dict[str, Any]], is_reprompt: bool) -> None:
        """Ask the upstream again (blocked calls' errors, approval answers); same client stream:
        the loop opens the round."""
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
            self.reprompts += 1  # counted and logged by the loop (proxy.rounds.asked_again)
        else:
            self.approval_rounds += 1
            log.info("approval_round", round=self.round, outputs=len(outputs), stream=True)
        self.asking = None
        self.round_data = {}
        self.reset_round()
        self.activate()
        self.emit(Reprompt(self.body, self.round, len(outputs), counted=is_reprompt))
