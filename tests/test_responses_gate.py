"""The Responses stream gate without sockets: streams from tests.responses_streams as bytes, fed
whole, split at every byte boundary and in seeded random chunkings; the gate's questions
answered by the real gate pipeline over a MemoryStore (proxy.gates.decide) and the real settler
(proxy.rounds.settle) with an in-memory auditor."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from proxy import audit, responses, rounds
from proxy.gates import decide
from proxy.gates.decision import Decision
from proxy.responses_gate import ResponsesGate
from proxy.store.memory import MemoryStore
from proxy.stream_effects import (
    Answered,
    Decide,
    Done,
    Effect,
    Ended,
    Fail,
    Record,
    Refuse,
    Reprompt,
    Send,
    Settle,
    Stash,
)
from proxy.toolcalls import CallContext
from tests.conftest import policy_from
from tests.responses_streams import fc, msg, response, rs, stream_events

UPSTREAM = "http://127.0.0.1:9/v1"  # never connected to: the gate does no I/O
TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("ok", "bad")
]
STRIP = {"on_block": "strip", "tools": {"bad": {"allow": False}}}
REPROMPT = {"on_block": "reprompt", "tools": {"bad": {"allow": False}}}
ERROR = {"on_block": "error", "tools": {"bad": {"allow": False}}}


class Auditor(audit.Auditor):
    """Records as proxy.audit.Auditor makes them: a decision once. (A subclass: compiled, the
    rounds take no other type; none of its own state is used.)"""

    def __init__(self) -> None:  # no super().__init__(): no file, no writer
        self.made: list[tuple[str, str, str | None]] = []

    def record(self, d: Decision, ctx: CallContext, outcome: str, action: str | None) -> None:
        if d.recorded:
            return
        d.recorded = True
        self.made.append((d.call.id, outcome, action))


NOTICE_ID = re.compile(re.escape(responses.NOTICE_PREFIX.encode()) + rb"[0-9a-f]{32}")


@dataclass
class Run:
    out: bytes = b""
    records: list[tuple[str, str, str | None]] = field(default_factory=list)
    orders: list[Effect] = field(default_factory=list)
    ending: Effect | None = None
    asked: list[Any] = field(default_factory=list)

    @property
    def events(self) -> list[dict[str, Any]]:
        found = []
        for block in self.out.split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    found.append(json.loads(line[6:]))
        return found


class Driver:
    """Plays the serve loop's part: answers the gate's questions, collects its orders."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.policy = policy_from(config, UPSTREAM)
        self.ctx = CallContext("alice", "req-1", "responses")
        self.body = {"model": "m", "input": "x", "stream": True, "tools": TOOLS}

    async def apply(self, gate: ResponsesGate, fx: list[Effect], run: Run) -> None:
        while True:
            ask = None
            for effect in fx:
                if isinstance(effect, Send):
                    assert not isinstance(run.ending, (Ended, Fail)), "nothing after the end"
                    run.out += effect.data
                elif isinstance(effect, (Decide, Settle, Refuse)):
                    assert effect is fx[-1], "a question is the last effect"
                    ask = effect
                elif isinstance(effect, (Done, Ended, Fail)):
                    if isinstance(effect, Fail):
                        run.out += effect.data
                    if not isinstance(run.ending, (Ended, Fail)):
                        run.ending = effect
                elif isinstance(effect, Record):
                    self.state.auditor.record(
                        effect.decision, self.ctx, effect.outcome, effect.action
                    )
                else:
                    run.orders.append(effect)
            if ask is None:
                return
            run.asked.append(ask)
            fx = gate.answer(await self.answer(ask))

    async def answer(self, ask: Any) -> Any:
        if isinstance(ask, Decide):
            return [await decide(c, self.policy, self.state.store, self.ctx) for c in ask.calls]
        if isinstance(ask, Settle):
            return rounds.settle(
                self.state, self.ctx, ask.decisions, ask.can_reprompt, ask.approvals
            )  # type: ignore[arg-type]
        return await rounds.refuse(self.state, ask.plan, ask.approvals)  # type: ignore[arg-type]

    async def run(self, *reads: list[bytes]) -> Run:
        """Each argument is one upstream round's reads."""
        self.state = SimpleNamespace(store=MemoryStore(), auditor=Auditor())
        gate = ResponsesGate(self.policy, self.body, self.ctx)
        run = Run()
        for at, chunks in enumerate(reads):
            run.ending = None
            for data in chunks:
                await self.apply(gate, gate.feed(data), run)
                if run.ending is not None:
                    break
            else:
                await self.apply(gate, gate.end(), run)
            if isinstance(run.ending, (Ended, Fail)):
                break
            before = len(run.orders)
            await self.apply(gate, gate.next_round(), run)
            asked = [o for o in run.orders[before:] if isinstance(o, Reprompt)]
            if not asked:
                break
            assert at + 1 < len(reads), "the gate asks for a round the test did not script"
        run.records = self.state.auditor.made
        run.out = NOTICE_ID.sub(b"notice", run.out)  # a fresh id per notice
        return run


def split_points(data: bytes, most: int = 400) -> list[int]:
    """Every byte boundary, or `most` of them evenly spread over a long stream."""
    step = max(1, len(data) // most)
    return list(range(1, len(data), step))


def random_chunks(data: bytes, rng: random.Random, most: int = 60) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        step = rng.randint(1, most)
        out.append(data[at : at + step])
        at += step
    return out


def assert_numbered(run: Run) -> None:
    """`sequence_number` contiguous from 0; each item's `output_index` new and contiguous."""
    events = run.events
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == list(range(len(added)))
    for e in events:
        if "output_index" in e:
            assert e["output_index"] in added, e


async def same_everywhere(driver: Driver, data: bytes, seeds: int = 30) -> Run:
    whole = await driver.run([data])
    for cut in split_points(data):
        run = await driver.run([data[:cut], data[cut:]])
        assert run.out == whole.out, f"split at {cut}"
        assert run.records == whole.records
    rng = random.Random(1234)
    for _ in range(seeds):
        run = await driver.run(random_chunks(data, rng))
        assert run.out == whole.out
        assert run.records == whole.records
    return whole


async def test_strip_is_the_same_at_every_split_and_never_shows_the_blocked_call() -> None:
    driver = Driver(STRIP)
    body = response(
        rs("first bad"),
        fc("bad", {"x": 1}, "c_bad"),
        msg("Hello there"),
        fc("ok", {"a": 1}, "c_ok"),
    )
    data = b"".join(stream_events(body, piece=5))
    whole = await same_everywhere(driver, data)
    assert isinstance(whole.ending, Done)
    assert b"c_bad" not in whole.out and b"first bad" not in whole.out  # reasoning dropped too
    assert b"c_ok" in whole.out
    assert_numbered(whole)
    [final] = [e for e in whole.events if e["type"] == "response.completed"]
    kinds = [(i["type"], i.get("call_id")) for i in final["response"]["output"]]
    assert kinds == [("message", None), ("function_call", "c_ok"), ("message", None)]  # + notice
    assert whole.records == [("c_ok", "allowed", None), ("c_bad", "blocked", "strip+stash")]
    stashed = [o for o in whole.orders if isinstance(o, Stash)]
    assert stashed and stashed[0].entry["outputs"][0]["call_id"] == "c_bad"


async def test_nothing_blocked_passes_the_upstream_bytes_unchanged() -> None:
    driver = Driver(STRIP)
    data = b"".join(stream_events(response(msg("plain text answer"), fc("ok", {"a": 2}, "c1"))))
    whole = await same_everywhere(driver, data, seeds=10)
    assert whole.out == data
    assert whole.records == [("c1", "allowed", None)]


async def test_error_mode_sends_none_of_the_calls() -> None:
    driver = Driver(ERROR)
    body = response(fc("ok", {"a": 1}, "c_ok"), fc("bad", {}, "c_bad"))
    data = b"".join(stream_events(body))
    whole = await same_everywhere(driver, data, seeds=10)
    assert isinstance(whole.ending, (Done, Ended))
    assert b"c_ok" not in whole.out and b"c_bad" not in whole.out
    assert whole.events[-1]["type"] == "error"
    assert_numbered(whole)
    assert sorted(whole.records) == [("c_bad", "blocked", "error"), ("c_ok", "withheld", "error")]


async def test_a_stream_cut_while_a_call_is_held_fails_closed() -> None:
    driver = Driver(STRIP)
    events = stream_events(response(msg("hi"), fc("ok", {"a": "long enough"}, "c_ok")), piece=3)
    data = b"".join(events[:-4])  # inside the call's argument deltas
    whole = await same_everywhere(driver, data, seeds=10)
    assert isinstance(whole.ending, Fail) and whole.ending.code == "incomplete_tool_call"
    assert b"c_ok" not in whole.out
    assert whole.events[-1]["type"] == "error"
    assert_numbered(whole)
    assert whole.records == [("c_ok", "blocked", "fail_closed")]


async def test_a_read_that_completes_several_calls_asks_once() -> None:
    """Eight calls done in one read are decided with one question (one store round trip); the
    client gets the same stream however the bytes are split into reads."""
    driver = Driver(STRIP)
    names = ["ok", "bad"] * 4
    ids = [f"c{i}_{n}" for i, n in enumerate(names)]
    body = response(msg("Sure"), *[fc(n, {"i": i}, ids[i]) for i, n in enumerate(names)])
    data = b"".join(stream_events(body))
    whole = await same_everywhere(driver, data, seeds=10)
    decides = [a for a in whole.asked if isinstance(a, Decide)]
    assert [[c.id for c in a.calls] for a in decides] == [ids]
    assert_numbered(whole)
    [final] = [e for e in whole.events if e["type"] == "response.completed"]
    sent = [i["call_id"] for i in final["response"]["output"] if i["type"] == "function_call"]
    assert sent == ids[0::2]
    assert sorted(whole.records) == sorted(
        [(i, "allowed", None) for i in ids[0::2]]
        + [(i, "blocked", "strip+stash") for i in ids[1::2]]
    )


async def test_an_error_event_after_a_done_call_in_the_same_read() -> None:
    """The upstream's error event comes in the read that completed a call: the call is decided
    and goes first, as it would have from a read of its own; the unfinished one is dropped."""
    driver = Driver(STRIP)
    events = stream_events(response(fc("ok", {"a": 1}, "c0"), fc("ok", {"b": 2}, "c1")), piece=3)
    second = next(i for i, e in enumerate(events) if b'"output_index": 1' in e)
    error = {"type": "error", "message": "overloaded", "sequence_number": second + 2}
    data = b"".join([*events[: second + 2], b"data: " + json.dumps(error).encode() + b"\n\n"])
    whole = await same_everywhere(driver, data, seeds=10)
    assert b'"c0"' in whole.out and b'"c1"' not in whole.out
    assert whole.events[-1]["type"] == "error"
    assert whole.records == [("c0", "allowed", None), ("c1", "blocked", "fail_closed")]


async def test_reprompt_continues_one_client_stream_numbered_without_gaps() -> None:
    driver = Driver(REPROMPT)
    first = b"".join(stream_events(response(msg("Let me"), fc("bad", {}, "c_bad"), rid="r1")))
    second = b"".join(stream_events(response(msg("Done instead."), rid="r2")))
    whole = await driver.run([first], [second])
    rng = random.Random(7)
    for _ in range(20):
        run = await driver.run(random_chunks(first, rng), random_chunks(second, rng))
        assert run.out == whole.out and run.records == whole.records
    assert b"c_bad" not in whole.out
    assert_numbered(whole)
    events = whole.events
    assert [e["type"] for e in events].count("response.created") == 1
    [final] = [e for e in events if e["type"] == "response.completed"]
    assert final["response"]["id"] == "r1"  # the client's id, across rounds
    texts = [i["content"][0]["text"] for i in final["response"]["output"]]
    assert texts == ["Let me", "Done instead."]
    [ask] = [o for o in whole.orders if isinstance(o, Reprompt)]
    outputs = [i for i in ask.body["input"] if i.get("type") == "function_call_output"]
    assert [o["call_id"] for o in outputs] == ["c_bad"]
    # Recorded once the next round answers (proxy.reprompt.asked, the loop's), not before.
    assert whole.records == []
    [answered] = [o for o in whole.orders if isinstance(o, Answered)]
    assert [d.call.id for d in answered.blocked] == ["c_bad"]


async def run_failing(driver: Driver, reads: list[bytes]) -> Run:
    """Driver.run for one round, with a failure the gate raises handled as the serve loop does."""
    from proxy.forward import StreamFailed

    driver.state = SimpleNamespace(store=MemoryStore(), auditor=Auditor())
    gate = ResponsesGate(driver.policy, driver.body, driver.ctx)
    run = Run()
    try:
        for data in reads:
            await driver.apply(gate, gate.feed(data), run)
            if run.ending is not None:
                break
        else:
            await driver.apply(gate, gate.end(), run)
    except StreamFailed as exc:
        await driver.apply(gate, gate.failed(str(exc), exc.code), run)
    run.records = driver.state.auditor.made
    return run


async def test_a_failure_in_the_read_that_completed_a_call_comes_after_it() -> None:
    """c0 is done, c1 has begun, then a malformed event in the same read: c0 is decided and
    delivered first, as from a read of its own, at every split (found in review)."""
    driver = Driver(STRIP)
    events = stream_events(response(fc("ok", {"a": 1}, "c0"), fc("ok", {"b": 2}, "c1")), piece=3)
    second = next(i for i, e in enumerate(events) if b'"output_index": 1' in e)
    data = b"".join(events[: second + 2]) + b"data: {not json\n\n"
    whole = await run_failing(driver, [data])
    for cut in split_points(data, most=120):
        run = await run_failing(driver, [data[:cut], data[cut:]])
        assert run.out == whole.out, f"split at {cut}"
        assert run.records == whole.records
    assert b'"c0"' in whole.out and b'"c1"' not in whole.out
    assert isinstance(whole.ending, Fail) and whole.ending.code == "upstream_malformed"
    assert whole.records == [("c0", "allowed", None), ("c1", "blocked", "fail_closed")]
