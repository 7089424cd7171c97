"""What a stream gate asks its serve loop to do: the gate is fed upstream bytes and answers
with effects; the loop (proxy.stream_loop) does every read, write, await and record.

A gate is plain logic, in the manner of h11: no sockets, no awaits, no clock. It can be driven
from a test with byte sequences. Two kinds of effect:

- orders, run in the order given: `Send` (queue bytes for the client; the loop writes what a
  read queued in one write, after the audit barrier), `Record`, `Release`, `Stash`,
  `Answered`, `RepromptFailed`, `Reprompt`, and the endings `Done` (this upstream round is
  over), `Ended` (the client stream is over) and `Fail` (fail closed with an error event);
- questions, always the last effect of a list: `Decide`, `Settle`, `Refuse`. The gate is
  suspended until the loop passes the answer to `Gate.answer` (the decisions, the Plan, the
  Refusal), which returns the next effects.

`GateSteps` is the machinery a gate shares: its slow paths are generators that `yield` a
question and receive the answer, so the logic reads top to bottom as it did with awaits.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

from mypy_extensions import mypyc_attr

from proxy.forward import StreamFailed
from proxy.gates.decision import Decision
from proxy.rounds import Plan
from proxy.toolcalls import ToolCall

# -- orders -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    data: bytes


@dataclass(slots=True)
class Record:
    """One audit record (Auditor.record)."""

    decision: Decision
    outcome: str
    action: str | None


@dataclass(slots=True)
class Release:
    """Give these decisions' reservations back, without waiting (it may run while the handler
    is being cancelled)."""

    decisions: list[Decision]


@dataclass(slots=True)
class Stash:
    keys: list[str]
    entry: dict[str, Any]
    ttl: float


@dataclass(slots=True)
class Answered:
    """The reprompt round was answered: its blocked calls' records (proxy.reprompt.asked)."""

    blocked: list[Decision]


@dataclass(slots=True)
class RepromptFailed:
    """The reprompt round failed upstream (proxy.reprompt.failed)."""

    blocked: list[Decision]
    status: str


@dataclass(slots=True)
class Reprompt:
    """Ask the upstream again with this body (counted by proxy.rounds.asked_again)."""

    body: dict[str, Any]
    round: int
    blocked: int
    counted: bool = True  # a reprompt; False: a round that answers MCP approval requests


@dataclass(slots=True)
class Done:
    """This upstream round is over: stop reading it, then call `Gate.next_round`."""


@dataclass(slots=True)
class Ended:
    """The client stream is over: write what is queued, read nothing more."""


@dataclass(slots=True)
class Fail:
    """Fail closed: what is queued goes only if it is on record, then `data` (an error event,
    which carries no call), and the stream is over."""

    message: str
    code: str
    data: bytes


# -- questions --------------------------------------------------------------------------------


@dataclass(slots=True)
class Decide:
    """Decide these calls, one after another (proxy.gates.decide): answer list[Decision]."""

    calls: list[ToolCall]


@dataclass(slots=True)
class Settle:
    """Settle the round (proxy.rounds.settle): answer its Plan."""

    decisions: list[Decision]
    can_reprompt: bool
    approvals: list[Decision] | None = None  # the round's MCP approval requests, decided


@dataclass(slots=True)
class Refuse:
    """A round planned as `error` (proxy.rounds.refuse): answer its Refusal."""

    plan: Plan
    approvals: list[Decision] | None = None


Ask = Decide | Settle | Refuse
Order = Send | Record | Release | Stash | Answered | RepromptFailed | Reprompt | Done | Ended | Fail
Effect = Order | Ask
Steps = Generator[Ask, Any, None]  # a slow path: yields questions, is sent their answers
DONE = Done()
ENDED = Ended()


class Gate(Protocol):
    """A stream gate as the serve loop drives it. Each call returns the effects to run."""

    route: str

    def feed(self, data: bytes) -> list[Effect]: ...  # the upstream's next bytes

    def end(self) -> list[Effect]: ...  # the upstream round ended (its body is read)

    def answer(self, value: Any) -> list[Effect]: ...  # the answer to the last question

    def next_round(self) -> list[Effect]: ...  # after Done: `Reprompt`, or nothing more

    def failed(self, message: str, code: str) -> list[Effect]: ...  # transport or audit

    def reprompt_failed(self, message: str, code: str, status: str) -> list[Effect]: ...

    def disconnected(self) -> list[Effect]: ...  # orders only; run at once, Sends dropped

    def cancelled(self) -> list[Effect]: ...  # as disconnected: cancelled, the client still there

    def crashed(self, exc: Exception) -> list[Effect] | None: ...  # None: the loop re-raises


@mypyc_attr(allow_interpreted_subclasses=True)
class GateSteps:
    """Effects queued by a gate, and the slow path suspended on a question."""

    def __init__(self) -> None:
        self._fx: list[Effect] = []
        self._buf: list[bytes] = []  # bytes to send, joined into one Send
        self._waiting: Steps | None = None
        # The round asked again, until the next round sends something (its `blocked`: the
        # calls that round had blocked); each gate keeps its own kind.
        self.pending: Any = None

    def send(self, data: bytes) -> None:
        self._buf.append(data)

    def write(self, data: bytes) -> None:
        """Bytes for the client that answer for the round: a reprompt is answered by them."""
        if self.pending is not None:
            self.reprompt_answered()  # the round answers: no strip fallback from here on
        self.send(data)

    def reprompt_answered(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            self.emit(Answered(pending.blocked))

    def emit(self, effect: Effect) -> None:
        if self._buf:
            self._fx.append(Send(b"".join(self._buf)))
            self._buf = []
        self._fx.append(effect)

    def take(self) -> list[Effect]:
        fx = self._fx
        if self._buf:
            fx.append(Send(b"".join(self._buf)))
            self._buf = []
        self._fx = []
        return fx

    def step(self, steps: Steps, value: Any = None) -> None:
        """Run a slow path until it asks a question or is over."""
        try:
            ask = steps.send(value)
        except StopIteration:
            self._waiting = None
            return
        except StreamFailed as exc:
            self._waiting = None
            self.on_failed(str(exc), exc.code)
            return
        self._waiting = steps
        self.emit(ask)

    def answer(self, value: Any) -> list[Effect]:
        steps = self._waiting
        if steps is None:
            raise RuntimeError("the gate asked no question")
        self.step(steps, value)
        return self.take()

    def drop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.close()
            self._waiting = None

    def end(self) -> list[Effect]:
        """The upstream finished this round's stream."""
        self.step(self.upstream_ended())
        return self.take()

    def failed(self, message: str, code: str) -> list[Effect]:
        """The loop could not go on (upstream broke, audit unavailable): fail closed."""
        self.drop_waiting()
        self.on_failed(message, code)
        return self.take()

    def events(self, first: Generator[Ask, Any, Any], events: list[bytes], at: int) -> Steps:
        """The rest of a read, from its first event on the slow path. A failure in it comes
        after the calls the read completed before it, as it would in a read of its own."""
        try:
            yield from self.read_events(first, events, at)
        except StreamFailed:
            yield from self.decide_held()
            raise

    def read_events(self, first: Generator[Ask, Any, Any], events: list[bytes], at: int) -> Steps:
        """The events of a read from `first` (the slow path of the one before) on."""
        raise NotImplementedError

    def decide_held(self) -> Steps:
        """Decide the calls completed since the last time, together, and send what waited."""
        raise NotImplementedError

    def upstream_ended(self) -> Steps:
        raise NotImplementedError

    def on_failed(self, message: str, code: str) -> None:
        raise NotImplementedError

    def disconnected(self) -> list[Effect]:
        raise NotImplementedError

    def cancelled(self) -> list[Effect]:
        """Cancelled while the client is still connected (a server shutting down): unless a
        gate words it otherwise, as a client that left."""
        return self.disconnected()

    def crashed(self, exc: Exception) -> list[Effect] | None:
        """The gate raised: its effects to end the stream, or None to let it propagate."""
        return None
