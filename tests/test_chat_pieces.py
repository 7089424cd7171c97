"""proxy.chat_pieces: the argument-piece fast path against the gate's general path.

The reference is the same gate with the fast path off (it never learns a template): over
random streams (arguments with quotes, backslashes, non-ASCII, control characters; encoders
that write them differently; events that change shape mid-call; comments; several calls and
choices) fed in random chunkings, both must send the client the same bytes and record the same
decisions. Then the template's own refusals, one by one.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from proxy import chat_pieces
from proxy.chat_held import ChoiceState, HeldCall
from tests.native_pass import spies_on_internals
from tests.streams import BASE, chat_stream, chunk
from tests.test_chat_gate import Driver, random_chunks

POLICY = {
    "on_block": "reprompt",
    "tools": {
        "search": {"rules": [{"name": "no_pw", "deny_if": 'args.q.contains("password")'}]},
        "bad": {"allow": False},
    },
}
ALPHABET = ['a', 'b', ' ', '"', "\\", "é", "😀", "{", "}", ":", ",", "\n", "/", "password", "\t"]


def _encoder(rng: random.Random) -> Any:
    return rng.choice(
        [
            lambda e: json.dumps(e).encode(),
            lambda e: json.dumps(e, separators=(",", ":")).encode(),
            lambda e: json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode(),
            orjson.dumps,
        ]
    )


def _stream(rng: random.Random) -> bytes:
    calls = []
    for _ in range(rng.randint(1, 3)):
        q = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
        calls.append((rng.choice(["search", "bad"]), {"q": q}))
    events: list[Any] = chat_stream(*calls, text="hi there", arg_piece=rng.randint(1, 9))
    # Perturbations the template must notice: a shape change mid-call, a comment, a piece
    # that is not a string, an extra field, a second choice.
    for _ in range(rng.randint(0, 3)):
        at = rng.randrange(1, len(events))
        kind = rng.randrange(5)
        if kind == 0:
            events.insert(at, b": keep-alive\n\n")
        elif kind == 1:
            event = dict(events[at]) if isinstance(events[at], dict) else None
            if event is not None and event.get("choices"):
                choice = dict(event["choices"][0])
                choice["logprobs"] = {"content": []}
                event["choices"] = [choice]
                events[at] = event
        elif kind == 2:
            events.insert(
                at, chunk({"tool_calls": [{"index": 0, "function": {"arguments": 5}}]})
            )
        elif kind == 3:
            events.insert(at, {**chunk({"content": "x"}), "extra": "field"})
        else:
            other = chunk({"content": "y"})
            other["choices"][0]["index"] = 1
            events.insert(at, other)
    encode = _encoder(rng)
    out = [e if isinstance(e, bytes) else b"data: " + encode(e) + b"\n\n" for e in events]
    return b"".join([*out, b"data: [DONE]\n\n"])


@pytest.mark.parametrize("seed", range(60))
async def test_fast_path_matches_the_general_path(seed: int) -> None:
    rng = random.Random(seed)
    data = _stream(rng)
    fast, reference = Driver(POLICY), Driver(POLICY)
    slow_gate = reference.gate()
    slow_gate.lessons = 0  # never learns a template: every event takes the general path
    expected = await reference.run(random_chunks(data, rng, 400), slow_gate)
    for chunks in ([data], random_chunks(data, rng, 30), random_chunks(data, rng, 300)):
        got = await fast.run(chunks)
        assert got.out == expected.out
        assert got.records == expected.records
        assert type(got.ending) is type(expected.ending)


@spies_on_internals
async def test_a_streamed_call_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = Driver(POLICY)
    arguments = json.dumps({"q": "latest results"})
    events = chat_stream(("search", arguments), arg_piece=3)
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    read: list[str | None] = []
    piece = chat_pieces.Template.piece

    def recording(self: chat_pieces.Template, event: bytes) -> str | None:
        read.append(piece(self, event))
        return read[-1]

    monkeypatch.setattr(chat_pieces.Template, "piece", recording)
    run = await driver.run([data])
    # The second piece teaches the template; every later one is read by it, the finish is not.
    pieces = [arguments[i : i + 3] for i in range(0, len(arguments), 3)]
    assert read == [*pieces[2:], None]
    sent = [
        tc["function"]["arguments"]
        for e in run.events
        if isinstance(e, dict)
        for c in e["choices"]
        for tc in c["delta"].get("tool_calls") or []
    ]
    assert sent == [arguments]  # coalesced, whole


def _learnt(piece: str = "abc", encode: Any = orjson.dumps) -> tuple[chat_pieces.Template, bytes]:
    first = chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    event = b"data: " + encode(first) + b"\n\n"
    call = HeldCall(index=0, args=["", "earlier", piece])
    choice = ChoiceState()
    choice.open[0] = call
    template = chat_pieces.learn(event, orjson.loads(event[6:]), {0: choice})
    assert template is not None
    return template, event


def _event(piece: Any, encode: Any = orjson.dumps, **extra: Any) -> bytes:
    e = chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    e.update(extra)
    return b"data: " + encode(e) + b"\n\n"


@pytest.mark.parametrize(
    "piece", ["next", "", 'a "quoted" \\ piece', "é😀", "line\nbreak", "{\"k\": [1, 2]}"]
)
def test_template_reads_any_string_piece(piece: str) -> None:
    template, _ = _learnt()
    assert template.piece(_event(piece)) == piece


@pytest.mark.parametrize(
    "event",
    [
        _event(5),  # not a string
        _event("x", id="other"),  # another envelope
        _event("x", usage={"total_tokens": 1}),  # a field more
        b'data: {"no": "shape"}\n\n',
        _event("x")[:-3] + b"\n\n",  # cut short
    ],
)
def test_template_refuses_other_shapes(event: bytes) -> None:
    template, _ = _learnt()
    assert template.piece(event) is None


def test_template_refuses_a_body_that_would_end_the_string() -> None:
    template, _ = _learnt()
    # The same head and tail around a body with a bare quote: a different JSON shape.
    sneaky = template.head + b'x","arguments":"y' + template.tail
    assert template.piece(sneaky) is None
    assert template.piece(template.head + b"x\\" + template.tail) is None  # escapes its quote


def test_no_template_when_the_piece_is_written_another_way() -> None:
    # ensure_ascii writes é as \\u00e9: the piece's bytes are not found as orjson writes them.
    event = _event("é", encode=lambda e: json.dumps(e).encode())
    call = HeldCall(index=0, args=["", "earlier", "é"])
    choice = ChoiceState()
    choice.open[0] = call
    assert chat_pieces.learn(event, orjson.loads(event[6:]), {0: choice}) is None


def test_no_template_when_the_piece_is_also_elsewhere() -> None:
    # The piece's text is also the id's: which one is the piece cannot be told from bytes.
    event = b"data: " + orjson.dumps(
        {**BASE, "id": "abc", **{"choices": chunk({"tool_calls": [
            {"index": 0, "function": {"arguments": "abc"}}]})["choices"]}}
    ) + b"\n\n"
    call = HeldCall(index=0, args=["", "earlier", "abc"])
    choice = ChoiceState()
    choice.open[0] = call
    assert chat_pieces.learn(event, orjson.loads(event[6:]), {0: choice}) is None


def test_no_template_from_a_call_s_first_piece() -> None:
    # A call of one or two pieces never pays for learning a template it could not use.
    event = _event("first")
    choice = ChoiceState()
    choice.open[0] = HeldCall(index=0, args=["", "first"])
    assert chat_pieces.learn(event, orjson.loads(event[6:]), {0: choice}) is None
    choice.open[0].args.append("second")
    assert chat_pieces.learn(_event("second"), orjson.loads(_event("second")[6:]), {0: choice})
