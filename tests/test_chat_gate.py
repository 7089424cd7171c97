"""The Chat Completions stream gate without sockets: scripted streams as bytes, fed in every
split and in random chunkings, the gate's questions answered by the real gate pipeline over a
MemoryStore (proxy.gates.decide) and the settler's plan (proxy.rounds)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from proxy import chat, rounds
from proxy.chat_gate import ChatGate
from proxy.gates import decide
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
    RepromptFailed,
    Send,
    Settle,
    Stash,
)
from proxy.toolcalls import CallContext
from tests.conftest import policy_from
from tests.streams import BASE, chat_stream, chunk

MSGS = [{"role": "user", "content": "hi"}]
UPSTREAM = "http://127.0.0.1:9/v1"  # never connected to: the gate does no I/O


def sse_bytes(events: list[Any], done: bool = True) -> bytes:
    """A stream as the upstream sends it (the way tests.conftest.SSE writes it)."""
    out = [
        e if isinstance(e, bytes) else b"data: " + json.dumps(e).encode() + b"\n\n" for e in events
    ]
    if done:
        out.append(b"data: [DONE]\n\n")
    return b"".join(out)


@dataclass
class Run:
    out: bytes = b""  # what the client receives
    orders: list[Effect] = field(default_factory=list)  # every other order, in order
    asked: list[Any] = field(default_factory=list)
    ending: Effect | None = None  # Done, Ended or Fail

    @property
    def events(self) -> list[Any]:
        """The client's events, decoded ([DONE], or a cut-off event passed on as it came, as
        the string)."""
        found = []
        for block in self.out.split(b"\n\n"):
            block = block.strip(b"\n")  # a cut-off last event is passed on with its own ends
            if block.startswith(b"data: "):
                try:
                    found.append(json.loads(block[6:]))
                except ValueError:
                    found.append(block[6:].decode())
        return found

    @property
    def records(self) -> list[tuple[str, str, str | None]]:
        return [
            (r.decision.call.id, r.outcome, r.action) for r in self.orders if isinstance(r, Record)
        ]


class Driver:
    """Plays the serve loop's part: answers the gate's questions, collects its orders."""

    def __init__(self, config: dict[str, Any], body: dict[str, Any] | None = None) -> None:
        self.policy = policy_from(config, UPSTREAM)
        self.store = MemoryStore()
        self.ctx = CallContext("alice", "req-1", "chat.completions")
        self.body = body or {"model": "m", "messages": MSGS, "stream": True}
        self.watch: list[str] = []  # call ids whose bytes must follow their records

    def gate(self) -> ChatGate:
        return ChatGate(self.policy, self.body, self.ctx)

    async def apply(self, gate: ChatGate, fx: list[Effect], run: Run) -> None:
        while True:
            ask = None
            for effect in fx:
                if isinstance(effect, Send):
                    assert run.ending is None or isinstance(run.ending, Done)
                    # Audit before delivery: a call's bytes never come before its record.
                    recorded = {r[0] for r in run.records}
                    for call_id in self.watch:
                        if call_id.encode() in effect.data:
                            assert call_id in recorded, f"{call_id} sent before its record"
                    run.out += effect.data
                elif isinstance(effect, (Decide, Settle, Refuse)):
                    assert effect is fx[-1], "a question is the last effect"
                    ask = effect
                elif isinstance(effect, (Done, Ended, Fail)):
                    if isinstance(effect, Fail):
                        run.out += effect.data
                    if not isinstance(run.ending, (Ended, Fail)):
                        run.ending = effect
                else:
                    run.orders.append(effect)
            if ask is None:
                return
            run.asked.append(ask)
            fx = gate.answer(await self.answer(ask))

    async def answer(self, ask: Any) -> Any:
        if isinstance(ask, Decide):
            return [await decide(c, self.policy, self.store, self.ctx) for c in ask.calls]
        if isinstance(ask, Settle):
            return rounds.plan_round(ask.decisions, ask.can_reprompt)
        return await rounds.refuse(SimpleNamespace(store=self.store), ask.plan)

    async def run(self, chunks: list[bytes], gate: ChatGate | None = None, end: bool = True) -> Run:
        gate = gate or self.gate()
        run = Run()
        for data in chunks:
            await self.apply(gate, gate.feed(data), run)
            if run.ending is not None:
                return run
        if end:
            await self.apply(gate, gate.end(), run)
        return run


def split_every(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


def random_chunks(data: bytes, rng: random.Random, most: int = 40) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        step = rng.randint(1, most)
        out.append(data[at : at + step])
        at += step
    return out


STRIP = {"on_block": "strip", "tools": {"bad": {"allow": False}}}


async def test_strip_stream_is_the_same_at_every_split_point() -> None:
    driver = Driver(STRIP)
    calls = (("bad", {"x": 1}), ("ok", {"a": 1}))
    data = sse_bytes(chat_stream(*calls, text="Hi", ids=["c_bad", "c_ok"]))
    whole = await driver.run([data])
    assert whole.out and isinstance(whole.ending, Done)
    for chunks in [*split_every(data), [data[i : i + 1] for i in range(len(data))]]:
        run = await driver.run(chunks)
        assert run.out == whole.out, f"split at {len(chunks[0])}"
        assert run.records == whole.records
        assert isinstance(run.ending, Done)

    events = whole.events
    assert events[-1] == "[DONE]"
    deltas = [c["delta"] for e in events[:-1] for c in e["choices"]]
    sent = [tc for delta in deltas for tc in delta.get("tool_calls") or []]
    # The blocked call never appears; the allowed one is renumbered to index 0, whole.
    ok = {"name": "ok", "arguments": '{"a": 1}'}
    assert sent == [{"index": 0, "id": "c_ok", "type": "function", "function": ok}]
    assert b"c_bad" not in whole.out
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    blocked = next(a.decisions for a in whole.asked if isinstance(a, Settle))
    assert text == "Hi \n\n" + chat.notice([d for d in blocked if not d.allowed])
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert whole.records == [("c_ok", "allowed", None)]  # the rest is the settler's (the loop's)
    # The surviving call carries the blocked one for the client's next turn.
    [stashed] = [o for o in whole.orders if isinstance(o, Stash)]
    assert stashed.entry["calls"][0]["id"] == "c_bad"


async def test_interleaved_choices_and_keep_alives_in_random_chunkings() -> None:
    """Two choices interleaved event by event (n=2), comments in between: whatever the reads,
    the client gets the same bytes."""
    driver = Driver(STRIP, {"model": "m", "messages": MSGS, "stream": True, "n": 2})
    first = chat_stream(("ok", {"a": 1, "b": "two"}), text="one two", ids=["c_ok"])
    calls = (("bad", {"x": [1, 2, 3]}), ("ok", {"a": 3}), ("ok", {"a": 4}))
    second = chat_stream(*calls, text="three", ids=["c_bad", "c_ok2", "c_ok3"])
    for e in second:
        e["choices"][0]["index"] = 1
    events: list[Any] = []
    for i in range(max(len(first), len(second))):
        events += [first[i]] if i < len(first) else []
        events += [second[i]] if i < len(second) else []
        if i % 3 == 0:
            events.append(b": keep-alive\n\n")
    data = sse_bytes(events)
    whole = await driver.run([data])
    assert isinstance(whole.ending, Done)
    rng = random.Random(12)
    for _ in range(300):
        run = await driver.run(random_chunks(data, rng))
        assert run.out == whole.out
        assert run.records == whole.records
    assert whole.out.count(b": keep-alive\n\n") == len([e for e in events if isinstance(e, bytes)])
    assert b"c_bad" not in whole.out
    by_choice: dict[int, list[Any]] = {0: [], 1: []}
    for e in whole.events[:-1]:
        for c in e["choices"]:
            by_choice[c["index"]] += [tc["index"] for tc in c["delta"].get("tool_calls") or []]
    assert by_choice == {0: [0], 1: [0, 1]}  # each choice's calls renumbered from 0


async def test_a_read_of_plain_text_passes_as_the_bytes_read() -> None:
    gate = Driver(STRIP).gate()
    data = sse_bytes(chat_stream(text="just some words")[:-1], done=False)
    fx = gate.feed(data)
    assert len(fx) == 1 and isinstance(fx[0], Send) and fx[0].data is data  # nothing re-encoded


async def test_error_mode_fails_the_stream_and_sends_no_call() -> None:
    driver = Driver({"on_block": "error", "tools": {"bad": {"allow": False}}})
    data = sse_bytes(chat_stream(("ok", {"a": 1}), ("bad", {}), text="Sure", ids=["c_ok", "c_bad"]))
    whole = await driver.run([data])
    for chunks in split_every(data)[::7]:
        assert (await driver.run(chunks)).out == whole.out
    # Both calls complete in the one read: decided together, one store round trip.
    assert [type(a) for a in whole.asked] == [Decide, Settle, Refuse]
    assert [c.name for c in whole.asked[0].calls] == ["ok", "bad"]
    error = whole.events[-1]
    assert error["error"]["type"] == "tool_call_blocked" and "'bad'" in error["error"]["message"]
    assert b"c_ok" not in whole.out and "[DONE]" not in whole.events  # deferred, then withheld


async def test_a_read_that_completes_several_calls_asks_once() -> None:
    """Eight calls in one read are decided with one question (one store round trip); however
    the bytes are split into reads, the client gets the same stream, each call after its
    record."""
    driver = Driver({"on_block": "strip", "tools": {"bad": {"allow": False}}})
    names = ["ok", "bad"] * 4
    ids = [f"c{i}_{n}" for i, n in enumerate(names)]
    driver.watch = ids
    data = sse_bytes(chat_stream(*[(n, {"i": i}) for i, n in enumerate(names)], text="Hi", ids=ids))
    whole = await driver.run([data])
    assert [type(a) for a in whole.asked] == [Decide, Settle]
    assert [c.id for c in whole.asked[0].calls] == ids
    rng = random.Random(3)
    for _ in range(150):
        run = await driver.run(random_chunks(data, rng))
        assert run.out == whole.out
        assert run.records == whole.records
    sent = [
        tc["id"]
        for e in whole.events[:-1]
        for c in e["choices"]
        for tc in c["delta"].get("tool_calls") or []
        if tc.get("id")
    ]
    assert sent == ids[0::2]  # the allowed ones, in order
    assert whole.records == [(i, "allowed", None) for i in ids[0::2]]  # each as it is sent
    settled = whole.asked[1].decisions  # the blocked ones are recorded when the round settles
    assert [d.call.id for d in settled if not d.allowed] == ids[1::2]


async def test_an_error_event_after_a_complete_call_in_the_same_read() -> None:
    """The upstream's error event comes in the read that completed a call: the call is decided
    and goes first, as it would have from a read of its own; the open call is dropped."""
    driver = Driver({})
    driver.watch = ["c0"]
    err = {"error": {"message": "overloaded", "type": "server_error"}}
    events = chat_stream(("ok", {"a": 1}), ("ok", {"b": 2}), ids=["c0", "c1"])
    data = sse_bytes([*events[:-2], err], done=False)  # no finish: c1 is still open
    whole = await driver.run([data])
    for chunks in split_every(data)[::5]:
        assert (await driver.run(chunks)).out == whole.out
    assert b'"c0"' in whole.out and b'"c1"' not in whole.out
    assert whole.events[-1]["error"]["message"] == "overloaded"
    # (c0 is offered again as the stream ends; the auditor keeps a decision's first record.)
    assert whole.records[0] == ("c0", "allowed", None)
    assert whole.records[-1] == ("c1", "blocked", "fail_closed")


REPROMPT = {"on_block": "reprompt", "tools": {"bad": {"allow": False}}}


async def test_reprompt_asks_with_the_blocked_turn_and_continues_the_stream() -> None:
    driver = Driver(REPROMPT)
    gate = driver.gate()
    data = sse_bytes(chat_stream(("bad", {"path": "/"}), text="Deleting", ids=["c_bad"]))
    run = await driver.run([data], gate)
    assert isinstance(run.ending, Done)
    [ask] = gate.next_round()
    assert isinstance(ask, Reprompt) and ask.round == 1 and ask.blocked == 1
    assistant, result = ask.body["messages"][1:]
    assert ask.body["messages"][0] == MSGS[0]
    assert assistant["role"] == "assistant" and assistant["content"] == "Deleting "
    assert assistant["tool_calls"][0]["id"] == "c_bad"
    assert result["role"] == "tool" and result["tool_call_id"] == "c_bad"
    assert json.loads(result["content"])["error"] == "tool_call_blocked"
    assert b"c_bad" not in run.out  # the first round's text went, its call did not

    again = {**BASE, "id": "chatcmpl-second", "created": 5}
    second = [{**e, **again} for e in chat_stream(text="I may not.")]
    rest = await driver.run([sse_bytes(second)], gate)
    first_answer = [o for o in rest.orders if isinstance(o, Answered)]
    assert [d.call.id for o in first_answer for d in o.blocked] == ["c_bad"]
    ids = {e["id"] for e in rest.events[:-1]}
    assert ids == {BASE["id"]}  # the client's stream goes on under its first id
    assert all("role" not in c["delta"] for e in rest.events[:-1] for c in e["choices"])
    assert gate.next_round() == []


async def test_reprompt_round_failing_upstream_ends_as_strip() -> None:
    driver = Driver(REPROMPT)
    gate = driver.gate()
    await driver.run([sse_bytes(chat_stream(("bad", {}), ids=["c_bad"]))], gate)
    assert isinstance(gate.next_round()[-1], Reprompt)
    fx = gate.reprompt_failed("upstream answered with HTTP 500", "upstream_error", "500")
    run = Run()
    await driver.apply(gate, fx, run)
    assert isinstance(run.ending, Ended)
    [failed] = [o for o in run.orders if isinstance(o, RepromptFailed)]
    assert failed.status == "500" and [d.call.id for d in failed.blocked] == ["c_bad"]
    events = run.events
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[0]["choices"][0]["delta"]["content"] == chat.notice(failed.blocked)


async def test_a_stream_cut_anywhere_fails_closed() -> None:
    """Cut at every byte: the stream ends (normally, or failed closed), and a blocked call or
    one still held never reaches the client."""
    driver = Driver(STRIP)
    data = sse_bytes(chat_stream(("bad", {"x": 1}), ("ok", {"a": 1}), ids=["c_bad", "c_ok"]))
    codes = set()
    for cut in range(len(data) + 1):
        run = await driver.run([data[:cut]])
        assert run.ending is not None
        assert b"c_bad" not in run.out
        if isinstance(run.ending, Fail):
            codes.add(run.ending.code)
            assert run.events[-1]["error"]["code"] == run.ending.code
            held = [r for r in run.records if r[2] == "fail_closed"]
            assert all(outcome == "blocked" for _, outcome, _ in held)
    # (a cut inside an event that may hold a call leaves it malformed)
    assert codes == {"upstream_truncated", "incomplete_tool_call", "upstream_malformed"}


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", b"data: [1, 2]\n\n"])
async def test_a_malformed_event_while_a_call_is_held_fails_closed(bad: bytes) -> None:
    driver = Driver(STRIP)
    events = chat_stream(("ok", {"a": 1}), ids=["c_ok"])
    data = sse_bytes(events[:3], done=False) + bad + sse_bytes(events[3:])
    run = await driver.run([data])
    assert isinstance(run.ending, Fail) and run.ending.code == "upstream_malformed"
    assert b"c_ok" not in run.out
    assert run.records == [("c_ok", "blocked", "fail_closed")]


async def test_an_upstream_error_event_passes_and_ends_the_stream() -> None:
    driver = Driver(STRIP)
    err = {"error": {"message": "overloaded", "type": "server_error"}}
    events = chat_stream(("ok", {"a": 1}), text="Hm", ids=["c_ok"])
    data = sse_bytes([*events[:4], err], done=False)  # while the call is held
    for chunks in [[data], *split_every(data)[::5]]:
        run = await driver.run(chunks)
        assert isinstance(run.ending, Done)
        assert run.events[-1] == err and b"c_ok" not in run.out
        assert run.records == [("c_ok", "blocked", "fail_closed")]


async def test_an_upstream_error_event_after_text_ends_the_stream_once() -> None:
    """With no call in play the error event goes on as text, unparsed; the stream the
    upstream then ends is over, with no error of callgate's after the upstream's."""
    driver = Driver(STRIP)
    err = {"error": {"message": "overloaded", "type": "server_error"}}
    data = sse_bytes([*chat_stream(text="Let me")[:3], err], done=False)
    for chunks in [[data], *split_every(data)[::7]]:
        run = await driver.run(chunks)
        assert isinstance(run.ending, Done), run.ending
        assert run.events[-1] == err
        assert [e for e in run.events if isinstance(e, dict) and "error" in e] == [err]
    # Events after the error: the stream did not end with it, so it is cut short as before.
    run = await driver.run([sse_bytes([*chat_stream(text="Let me")[:3], err, chunk({})], False)])
    assert isinstance(run.ending, Fail) and run.ending.code == "upstream_truncated"


async def test_a_client_that_leaves_gets_its_decided_calls_recorded() -> None:
    driver = Driver({"on_block": "error", "tools": {"bad": {"allow": False}}})
    gate = driver.gate()
    events = chat_stream(("ok", {"a": 1}), ("bad", {}), ids=["c_ok", "c_bad"])
    await driver.run([sse_bytes(events[:-1], done=False)], gate, end=False)
    fx = gate.disconnected()
    assert not any(isinstance(e, Send) for e in fx)
    records = [(r.decision.call.id, r.outcome, r.action) for r in fx if isinstance(r, Record)]
    # The first call was decided (allowed, deferred: never sent), the second still held.
    assert records == [
        ("c_ok", "blocked", "client_disconnected"),
        ("c_bad", "blocked", "client_disconnected"),
    ]


# -- found in review: the calls a read completes, and what else happens in that read ------------


async def run_to_end(driver: Driver, reads: list[bytes], gate: ChatGate | None = None) -> Run:
    """Like Driver.run, with a failure the gate raises handled as the serve loop does."""
    from proxy.forward import StreamFailed

    gate = gate or driver.gate()
    run = Run()
    try:
        for data in reads:
            await driver.apply(gate, gate.feed(data), run)
            if run.ending is not None:
                return run
        await driver.apply(gate, gate.end(), run)
    except StreamFailed as exc:
        await driver.apply(gate, gate.failed(str(exc), exc.code), run)
    return run


@pytest.mark.parametrize("ending", [b"data: {not json\n\n", b"data: [DONE]\n\n"])
async def test_a_failure_in_the_read_that_completed_a_call_comes_after_it(ending: bytes) -> None:
    """c0 completes (c1 starts), then the read fails (a malformed event; [DONE] with c1 open):
    c0 is decided and delivered first, as from a read of its own, at every split."""
    driver = Driver({"on_block": "strip"})
    driver.watch = ["c0"]
    events = chat_stream(("ok", {"a": 1}), ("ok", {"b": 2}), text="Hi", ids=["c0", "c1"])
    at = next(i for i, e in enumerate(events) if "c1" in str(e))
    data = sse_bytes(events[: at + 1], done=False) + ending
    whole = await run_to_end(driver, [data])
    for chunks in split_every(data)[::3]:
        run = await run_to_end(driver, chunks)
        assert run.out == whole.out and run.records == whole.records
    assert b'"c0"' in whole.out and b'"c1"' not in whole.out
    assert isinstance(whole.ending, Fail)
    assert whole.records[0] == ("c0", "allowed", None)
    assert whole.records[-1] == ("c1", "blocked", "fail_closed")


async def test_a_keep_alive_held_behind_a_call_answers_no_reprompt() -> None:
    """In a reprompt round, a comment after a held call goes out past write(), as ever: the
    round's failure still ends the stream as strip would, wherever the read was cut."""
    driver = Driver(REPROMPT)
    outcomes = []
    for split in (False, True):
        gate = driver.gate()
        await driver.run([sse_bytes(chat_stream(("bad", {}), ids=["c_bad"]))], gate)
        assert isinstance(gate.next_round()[-1], Reprompt)
        again = {**BASE, "id": "chatcmpl-2"}
        events = [
            {**e, **again}
            for e in chat_stream(("bad", {"x": 1}), ("ok", {"y": 2}), ids=["c2_bad", "c2_ok"])
        ]
        at = next(i for i, e in enumerate(events) if "c2_ok" in str(e))
        head = sse_bytes(events[1 : at + 1], done=False)
        reads = [head, b": keep-alive\n\n"] if split else [head + b": keep-alive\n\n"]
        run = await run_to_end(driver, reads, gate)
        outcomes.append((run.out, [type(o).__name__ for o in run.orders]))
        assert "RepromptFailed" in outcomes[-1][1] and "Answered" not in outcomes[-1][1]
        assert b"[DONE]" in run.out  # strip's ending, not an error event
    assert outcomes[0] == outcomes[1]


async def test_a_client_leaving_while_calls_are_decided_leaves_them_on_record() -> None:
    driver = Driver({"on_block": "strip"})
    gate = driver.gate()
    events = chat_stream(("ok", {"a": 1}), ("ok", {"b": 2}), ids=["c0", "c1"])
    at = next(i for i, e in enumerate(events) if "c1" in str(e))
    fx = gate.feed(sse_bytes(events[: at + 1], done=False))
    assert isinstance(fx[-1], Decide) and [c.id for c in fx[-1].calls] == ["c0"]
    left = gate.disconnected()  # the question is never answered
    recorded = [(r.decision.call.id, r.outcome) for r in left if isinstance(r, Record)]
    assert recorded == [("c0", "blocked"), ("c1", "blocked")]
