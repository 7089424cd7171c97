"""A gated stream's response to the client: its headers go out with its first bytes.

aiohttp's StreamResponse writes its headers at `prepare()`, and the end of a chunked body in a
write of its own: three writes (three system calls, three segments the client wakes for) for a
stream that arrives from the upstream in one read, which under load is most of them. Here the
headers wait for the first bytes (as aiohttp's own `Response` does) and the stream loop ends the
body with its last bytes, so such a stream costs one write.

The client still learns promptly that the stream started: should nothing be sent within
HEADERS_AFTER of `prepare()` (a call held while its arguments stream in, a decision that waits
for a human, a slow upstream), the headers go out alone then, as they did before.

The head and the chunks are rendered by proxy.http_answer and written to the transport here,
not through aiohttp's payload writer (its general path costs more per stream than the framing
itself); where http_answer leaves a response to aiohttp (HTTP/1.0, compression, ...), aiohttp's
path runs, with the same deferred headers.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestHandler

from proxy import http_answer

HEADERS_AFTER = 0.05  # seconds: a held first byte never holds the headers longer


class EventStream(web.StreamResponse):
    # aiohttp's Response sets the same class attribute: headers go with the first write.
    _send_headers_immediately = False

    _timer: asyncio.TimerHandle | None = None
    # Our own path (see the module docstring): the connection's protocol, the head while it
    # waits for the first bytes, and aiohttp's writer of the request, which is never written
    # through but counts what was sent: aiohttp's error handling reads that count to know a
    # response is under way (then it closes the connection rather than answer again).
    _protocol: RequestHandler | None = None
    _pending_head: bytes | None = None
    _counter: AbstractStreamWriter | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent or self._payload_writer is not None:
            return await super().prepare(request)  # prepared already: as aiohttp
        transport = request.transport
        if transport is None or transport.is_closing():
            # Where writing the headers at once would have failed: a client that left
            # before the upstream answered gets no gate deciding (and reserving) for it.
            raise ConnectionResetError("the client disconnected before its stream started")
        head = http_answer.stream_head(request, self)
        if head is None:
            writer = await super().prepare(request)
        else:
            self._req = request
            self._protocol = request.protocol
            self._pending_head = head
            # aiohttp reads `prepared` from this; nothing is ever written through it here.
            writer = self._payload_writer = self._counter = request._payload_writer
        self._timer = asyncio.get_running_loop().call_later(HEADERS_AFTER, self._headers_now)
        return writer

    def _headers_now(self) -> None:
        self._timer = None
        if self._protocol is not None:
            if self._protocol._current_request is not self._req:
                return  # the handler answered with another response: this one never starts
            head, self._pending_head = self._pending_head, None
            if head is not None:
                self._count(len(head))
                transport = self._protocol.transport
                if transport is not None and not transport.is_closing():
                    transport.write(head)
            return
        writer = self._payload_writer
        if writer is not None:
            try:
                writer.send_headers()  # a no-op once they went with the first bytes
            except ConnectionError:
                pass  # the client left: the stream loop finds out at its next write

    def _sent(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _send(self, data: bytes) -> None:
        assert self._protocol is not None
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")  # as aiohttp
        head, self._pending_head = self._pending_head, None
        if head is not None:
            data = head + data
        self._count(len(data))
        transport.write(data)

    def _count(self, size: int) -> None:
        if self._counter is not None:
            self._counter.output_size += size

    async def _drain(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None and protocol.writing_paused:
            await protocol._drain_helper()  # a slow reader: wait, as aiohttp's writer does

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._timer is not None:
            self._sent()
        if self._protocol is None:
            await super().write(data)
            return
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        if data:
            self._send(http_answer.chunk(bytes(data)))
            await self._drain()
        elif self._pending_head is not None:
            self._send(b"")  # as aiohttp: an empty write sends the headers

    async def write_eof(self, data: bytes = b"") -> None:
        if self._timer is not None:
            self._sent()
        if self._protocol is None:
            await super().write_eof(data)
            return
        if self._eof_sent:
            return
        last = http_answer.LAST_CHUNK
        self._send(http_answer.chunk(data) + last if data else last)
        self._eof_sent = True
        self._req = None
        self._payload_writer = None
        if self._counter is not None:
            self._body_length = self._counter.output_size  # as aiohttp's write_eof
        await self._drain()
