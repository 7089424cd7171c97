"""The Responses stream's numbering, as the client sees it (proxy.responses_gate).

Once anything was dropped or added, every event after it is renumbered: `sequence_number`
stays contiguous and `output_index` unique and contiguous. Raw events are patched at the byte
level (the two fields only); events callgate writes itself are encoded with the next number.
Plain bookkeeping: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy import sse

_SEQ = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
_INDEX = re.compile(rb'"output_index"\s*:\s*(\d+)')
# Bytes that an event which matters for gating must contain (a false positive costs a parse).
_MATTERS = (
    b"response.output_item.",
    b"response.function_call_arguments.",
    b"response.custom_tool_call_input.",
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"response.created",
    b"response.in_progress",
    b"response.queued",
    b'"error"',
    sse.DONE,
)


def may_matter(data: bytes) -> bool:
    return any(marker in data for marker in _MATTERS)


def output_index(event: bytes) -> int | None:
    """The upstream's `output_index` of a raw event, read from its bytes."""
    match = _INDEX.search(event)
    return int(match.group(1)) if match else None


class Numbering:
    """The client's `sequence_number` and `output_index`."""

    def __init__(self) -> None:
        self.renumber = False  # renumbering starts with the first event dropped, added, swallowed
        self.next_seq = 0
        self.last_out: bytes | None = None  # last raw bytes sent that carry a sequence_number
        self.next_index = 0
        self.index_map: dict[int, int] = {}  # this round's upstream output_index -> client's
        self.event_lines = False  # the upstream names events (`event: ...` lines): we do too

    def activate(self) -> None:
        """From here on, number every event we send ourselves."""
        if self.renumber:
            return
        self.renumber = True
        if self.last_out is not None:
            found = _SEQ.findall(self.last_out)
            if found:
                self.next_seq = int(found[-1]) + 1

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def client_index(self, up: int) -> int:
        index = self.index_map.get(up)
        if index is None:
            index = self.next_index if self.renumber else up
            self.index_map[up] = index
            self.next_index = max(self.next_index, index + 1)
        return index

    def numbered(self, data: bytes) -> bytes:
        """Raw bytes of one or more events, as the client gets them."""
        if not self.renumber:
            if b'"sequence_number"' in data:
                self.last_out = data
            return data
        return self.patch(data)

    def patch(self, data: bytes) -> bytes:
        data = _SEQ.sub(lambda _: b'"sequence_number":%d' % self.take_seq(), data)

        def index(m: re.Match[bytes]) -> bytes:
            return b'"output_index":%d' % self.client_index(int(m.group(1)))

        return _INDEX.sub(index, data)

    def encode(self, obj: dict[str, Any]) -> bytes:
        if self.renumber:
            obj["sequence_number"] = self.take_seq()
        data = b"data: " + orjson.dumps(obj) + b"\n\n"
        if self.event_lines and isinstance(obj.get("type"), str):
            data = b"event: " + obj["type"].encode() + b"\n" + data
        return data

    def error_event(self, message: str, type_: str, code: str) -> bytes:
        """The Responses streaming `error` event, as OpenAI sends it (the SDKs raise APIError)."""
        self.activate()
        error = {"type": type_, "code": code, "message": message, "param": None}
        obj = {
            "type": "error",
            "sequence_number": self.take_seq(),
            "code": code,
            "message": message,
            "param": None,
            "error": error,
        }
        return b"event: error\ndata: " + orjson.dumps(obj) + b"\n\n"

    def notice_events(self, note: dict[str, Any]) -> list[bytes]:
        """A complete message item, event by event, as the upstream would stream it."""
        self.activate()
        index = self.next_index
        self.next_index += 1
        item_id = note["id"]
        part = note["content"][0]
        text = part["text"]
        empty = {**part, "text": ""}
        common = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            self.encode(obj)
            for obj in (
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**note, "status": "in_progress", "content": []},
                },
                {"type": "response.content_part.added", **common, "part": empty},
                {"type": "response.output_text.delta", **common, "delta": text, "logprobs": []},
                {"type": "response.output_text.done", **common, "text": text, "logprobs": []},
                {"type": "response.content_part.done", **common, "part": part},
                {"type": "response.output_item.done", "output_index": index, "item": note},
            )
        ]
