"""The Chat Completions stream gate's own work per stream, in process (no sockets, no store).

    python -m bench.bench_stream_gate [--streams 2000] [--rounds 3]

Feeds whole streams to `ChatGate` (the bench policy's rules and schema in the policy, though
the gate's question is never answered: this measures reading the stream up to the decision)
and prints microseconds per stream for streams whose one call streams its arguments in
pieces of 4 characters, as OpenAI's models do, at several argument lengths: with the
argument-piece fast path (proxy.chat_pieces) and with the general path alone (the reference),
in alternating rounds, best of each.
"""

from __future__ import annotations

import argparse
import json
import time

import orjson

from bench.common import chat_request, stream_event
from proxy.chat_gate import ChatGate
from proxy.policy import load_policy_text
from proxy.toolcalls import CallContext

POLICY = """\
upstream: {base_url: "http://127.0.0.1:9/v1"}
tools:
  search_web:
    rules:
      - {name: no_pii, deny_if: 'args.query.lowerAscii().contains("ssn")'}
    arguments_schema: {type: object, required: [query]}
"""
def stream(length: int, piece: int = 4) -> bytes:
    """Role, a few words of text, one call whose arguments are `length` characters long in
    pieces of `piece`, the finish and [DONE]."""
    arguments = json.dumps({"query": "x" * max(0, length - 13)})
    events = [stream_event({"role": "assistant", "content": ""})]
    events += [stream_event({"content": w}) for w in ("Let ", "me ", "look.")]
    function = {"name": "search_web", "arguments": ""}
    start = {"index": 0, "id": "call_1", "type": "function", "function": function}
    events.append(stream_event({"tool_calls": [start]}))
    for at in range(0, len(arguments), piece):
        part = arguments[at : at + piece]
        events.append(stream_event({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
    events.append(stream_event({}, "tool_calls"))
    return b"".join([*events, b"data: [DONE]\n\n"])


def per_stream(data: bytes, streams: int, fast: bool) -> float:
    policy = load_policy_text(POLICY)
    body = orjson.loads(chat_request(True))
    ctx = CallContext("bench", "r", "chat.completions")
    started = time.perf_counter()
    for _ in range(streams):
        gate = ChatGate(policy, body, ctx)
        if not fast:
            gate.lessons = 0  # never learns a template: the general path for every event
        gate.feed(data)
    return (time.perf_counter() - started) / streams * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print("arguments  events  general path  fast path  ratio")
    for length in (40, 400, 4000):
        data = stream(length)
        events = data.count(b"\n\n")
        slow = fast = float("inf")
        for _ in range(args.rounds):
            slow = min(slow, per_stream(data, args.streams, False))
            fast = min(fast, per_stream(data, args.streams, True))
        print(f"{length:9d}  {events:6d}  {slow:9.1f} us  {fast:6.1f} us  {slow / fast:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
