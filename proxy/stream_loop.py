"""The one serve loop of a gated stream: reads the upstream, feeds the gate, runs its effects.

The gate (proxy.stream_effects.Gate; proxy.chat_gate for Chat Completions) holds the stream's
logic and does no I/O. This loop does all of it, for any gate: reading the upstream round
(`forward.next_chunk`: its timeouts, deadline and size bounds turn into `StreamFailed`), the
decisions (proxy.gates.decide), the settler (proxy.rounds), the stash, the records, the audit
barrier (nothing that carries a call is written before its record is: proxy.delivery), one
client write per upstream read (the last one's together with the end of the response, the
headers with the first: proxy.stream_response), the reprompt rounds (`forward.open_round`),
and a client that leaves (its decided calls recorded, unsent reservations given back).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import web

from proxy import http1, reprompt, stash
from proxy.delivery import on_record
from proxy.forward import StreamFailed, next_chunk, open_round
from proxy.gates import decide, decide_many, release
from proxy.policy import Policy
from proxy.rounds import asked_again, refuse, settle
from proxy.state import AppState
from proxy.stream_effects import (
    Answered,
    Ask,
    Decide,
    Done,
    Effect,
    Ended,
    Fail,
    Gate,
    Record,
    Refuse,
    Release,
    Reprompt,
    RepromptFailed,
    Send,
    Settle,
    Stash,
)
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.stream")
_background: set[asyncio.Task[None]] = set()  # refunds scheduled from cancelled handlers

GO_ON, ROUND_OVER, STREAM_OVER = 0, 1, 2


class StreamLoop:
    """Serves one client stream through `gate` (forward.serve_stream calls `run`)."""

    def __init__(
        self,
        request: web.Request,
        out: web.StreamResponse,
        state: AppState,
        policy: Policy,
        ctx: CallContext,
        gate: Gate,
    ) -> None:
        self.request = request
        self.out = out
        self.state = state
        self.policy = policy
        self.ctx = ctx
        self.gate = gate
        self.queued: list[bytes] = []
        self.next: Reprompt | None = None
        # The upstream's last read: what it sends waits here to go out with the end of the
        # response, in one write (None: writes go out as they come).
        self.tail: list[bytes] | None = None

    async def run(self, resp: http1.Response) -> None:
        self.state.streams += 1
        try:
            await self._run(resp)
        finally:
            self.state.streams -= 1

    async def _run(self, resp: http1.Response) -> None:
        gate = self.gate
        try:
            await self.rounds(resp)
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client left (aiohttp's reset error is a ConnectionResetError), or a server
            # with handler cancellation cancelled on its disconnect; else it is shutting down.
            transport = self.request.transport
            if isinstance(exc, ConnectionError) or transport is None or transport.is_closing():
                self.apply_now(gate.disconnected())
            else:
                self.apply_now(gate.cancelled())
            raise
        except Exception as exc:
            fx = gate.crashed(exc)
            if fx is None:
                # What was taken as sent (its calls on record) still precedes serve_stream's
                # error event, as it would have had it not waited to go with the end.
                with contextlib.suppress(ConnectionError):
                    await self.untail()
                raise
            log.exception("stream_gate_error")
            try:
                await self.apply(fx)
            except Exception:
                log.exception("stream_gate_error_unrecorded")
        tail, self.tail = self.tail, None
        await self.out.write_eof(b"".join(tail) if tail else b"")

    def asked(self) -> Reprompt | None:
        # apply() sets self.next; read in rounds() right after `self.next = None`, mypy keeps
        # the attribute narrowed to None across that call, and compiled code (proxy.native)
        # would check the answer against None.
        return self.next

    async def rounds(self, resp: http1.Response) -> None:
        gate = self.gate
        while True:
            try:
                over = await self.pump(resp)
            except StreamFailed as exc:
                await self.apply(gate.failed(str(exc), exc.code))
                return
            finally:
                resp.close()  # a no-op once read to the end; cancels the upstream otherwise
            if over == STREAM_OVER:
                return
            self.next = None
            await self.apply(gate.next_round())
            ask = self.asked()
            if ask is None:
                return
            await self.untail()  # the client has this round's end before the next one starts
            if ask.counted:
                asked_again(self.state, gate.route, ask.round, ask.blocked, stream=True)
            next_resp, message, code, status = await open_round(
                self.state, self.request, ask.body, self.policy.config.upstream
            )
            if next_resp is None:
                label = str(status) if status is not None else reprompt.label(code)
                await self.apply(gate.reprompt_failed(message, code, label))
                return
            resp = next_resp

    async def pump(self, resp: http1.Response) -> int:
        """Read one upstream round to its end, or until the gate says it is over."""
        feed, write = self.gate.feed, self.out.write
        unwritten, ctx = self.state.auditor.unwritten, self.ctx
        while (data := await next_chunk(resp)) is not None:
            if resp.at_end:
                # The upstream's last bytes: what they and the round's end send goes out with
                # the end of the response, in one write (`untail` if another round follows).
                self.tail = []
                over = await self.apply(fx) if (fx := feed(data)) else GO_ON
                return over or await self.apply(self.gate.end())
            fx = feed(data)
            if not fx:
                continue  # held: the next piece of a call's arguments
            if len(fx) == 1 and type(send := fx[0]) is Send and not unwritten(ctx):
                await write(send.data)  # the common read: text, nothing to wait for
                continue
            over = await self.apply(fx)
            if over:
                return over
        return await self.apply(self.gate.end())

    async def apply(self, fx: list[Effect]) -> int:
        """Run a list of effects in order, answering the gate's questions as they come, then
        write what they queued."""
        over = GO_ON
        while True:
            ask: Ask | None = None
            for effect in fx:
                kind = type(effect)
                if kind is Send:
                    self.queued.append(effect.data)  # type: ignore[union-attr]
                elif kind is Done:
                    over = max(over, ROUND_OVER)
                elif kind is Ended:
                    over = STREAM_OVER
                elif kind is Fail:
                    assert isinstance(effect, Fail)
                    await self.fail(effect)
                    return STREAM_OVER
                elif kind is Stash:
                    assert isinstance(effect, Stash)
                    await stash.put(self.state.store, effect.keys, effect.entry, effect.ttl)
                elif kind in (Decide, Settle, Refuse):
                    ask = effect  # type: ignore[assignment]
                else:
                    self.order(effect)
            if ask is None:
                break
            fx = self.gate.answer(await self.answer(ask))
        await self.flush()
        return over

    def apply_now(self, fx: list[Effect]) -> None:
        """Orders that need no await (the handler may be being cancelled)."""
        for effect in fx:
            self.order(effect)

    def order(self, effect: Effect) -> None:
        if isinstance(effect, Record):
            self.state.auditor.record(effect.decision, self.ctx, effect.outcome, effect.action)
        elif isinstance(effect, Answered):
            reprompt.asked(self.state, self.ctx, effect.blocked)
        elif isinstance(effect, RepromptFailed):
            reprompt.failed(self.state, self.ctx, self.gate.route, effect.blocked, effect.status)
        elif isinstance(effect, Release):
            # Not awaited: this also runs while the handler is being cancelled.
            task = asyncio.get_running_loop().create_task(
                release(self.state.store, effect.decisions)
            )
            _background.add(task)
            task.add_done_callback(_background.discard)
        elif isinstance(effect, Reprompt):
            self.next = effect

    async def answer(self, ask: Ask) -> Any:
        if isinstance(ask, Decide):
            calls = ask.calls
            if len(calls) == 1:
                return [await decide(calls[0], self.policy, self.state.store, self.ctx)]
            # Several at once (calls a terminal event brought unannounced, approval requests):
            # every call's reservation in one store round trip, each all-or-nothing on its own.
            return await decide_many(calls, self.policy, self.state.store, self.ctx)
        if isinstance(ask, Settle):
            return settle(self.state, self.ctx, ask.decisions, ask.can_reprompt, ask.approvals)
        return await refuse(self.state, ask.plan, ask.approvals)

    async def flush(self) -> None:
        queued = self.queued
        if queued:
            if self.state.auditor.unwritten(self.ctx):
                try:
                    await on_record(self.state, self.ctx)  # audit before delivery
                except StreamFailed:
                    queued.clear()  # never sent unrecorded: the stream fails closed
                    raise
            data = b"".join(queued) if len(queued) > 1 else queued[0]
            queued.clear()
            await self.send(data)

    async def send(self, data: bytes) -> None:
        if self.tail is not None:
            self.tail.append(data)
        else:
            await self.out.write(data)

    async def untail(self) -> None:
        tail, self.tail = self.tail, None
        if tail:
            await self.out.write(b"".join(tail))

    async def fail(self, effect: Fail) -> None:
        log.warning("stream_failed", code=effect.code, error=effect.message)
        try:
            with contextlib.suppress(StreamFailed):  # what was queued goes only if on record
                await self.flush()
            await self.send(effect.data)  # carries no call: no wait
        except (ConnectionResetError, RuntimeError):
            pass
