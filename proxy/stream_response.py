"""A gated stream's response to the client: its headers go out with its first bytes.

aiohttp's StreamResponse writes its headers at `prepare()`, and the end of a chunked body in a
write of its own: three writes (three system calls, three segments the client wakes for) for a
stream that arrives from the upstream in one read, which under load is most of them. Here the
headers wait for the first bytes (as aiohttp's own `Response` does) and the stream loop ends the
body with its last bytes, so such a stream costs one write.

The client still learns promptly that the stream started: should nothing be sent within
HEADERS_AFTER of `prepare()` (a call held while its arguments stream in, a decision that waits
for a human, a slow upstream), the headers go out alone then, as they did before.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

HEADERS_AFTER = 0.05  # seconds: a held first byte never holds the headers longer


class EventStream(web.StreamResponse):
    # aiohttp's Response sets the same class attribute: headers go with the first write.
    _send_headers_immediately = False

    _timer: asyncio.TimerHandle | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        first = self._payload_writer is None and not self._eof_sent
        writer = await super().prepare(request)
        if first and writer is not None:
            transport = request.transport
            if transport is None or transport.is_closing():
                # Where writing the headers at once would have failed: a client that left
                # before the upstream answered gets no gate deciding (and reserving) for it.
                raise ConnectionResetError("the client disconnected before its stream started")
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(HEADERS_AFTER, self._headers_now)
        return writer

    def _headers_now(self) -> None:
        self._timer = None
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

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._timer is not None:
            self._sent()
        await super().write(data)

    async def write_eof(self, data: bytes = b"") -> None:
        if self._timer is not None:
            self._sent()
        await super().write_eof(data)
