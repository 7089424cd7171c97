"""proxy.sse.EventSplitter (its split is the re engine's) against the reference it replaced (the
same steps with bytes.split), fed the same generated streams in the same chunks."""

from __future__ import annotations

import random

from proxy.sse import EventSplitter

SEED = 20261203


class ReferenceSplitter:
    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf
            return []
        self.buf = buf[end + 2 :]
        return [ev + b"\n\n" for ev in buf[:end].split(b"\n\n") if ev.strip()]


def chunked(stream: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def test_the_splitter_gives_the_references_events_at_any_chunking() -> None:
    rng = random.Random(SEED)
    alphabet = [b"data: x", b"data: {}\n\n", b"\n", b"\n\n", b"\r\n", b"\r", b" ", b": c"]
    events = 0
    for _ in range(3000):
        stream = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        fast, slow = EventSplitter(), ReferenceSplitter()
        for chunk in chunked(stream, rng):
            got = fast.feed(chunk)
            assert got == slow.feed(chunk), stream
            events += len(got)
        assert fast.rest() == slow.buf, stream
    assert events > 4000


def test_a_long_stream_splits_into_its_events() -> None:
    events = [b'data: {"n":%d}\n\n' % i for i in range(1000)]
    splitter = EventSplitter()
    assert splitter.feed(b"".join(events) + b"data: partial") == events
    assert splitter.rest() == b"data: partial"
