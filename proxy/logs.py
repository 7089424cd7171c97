"""structlog set-up: one JSON object per line on stdout, request id bound per request.

Lines are buffered and written in batches (at most `FLUSH_SECONDS` late, or once 64 KiB
gather): a write-and-flush per line costs a system call per request. Errors and anything
logged with no event loop running are written at once, and the buffer is flushed at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
from typing import Any

import orjson
import structlog

FLUSH_SECONDS = 0.05
_MAX_BUFFER = 64 * 1024
_URGENT = frozenset(("error", "critical", "exception", "fatal"))


class LineWriter:
    """A structlog logger writing bytes lines to a file descriptor, batched on the event loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.scheduled = False

    def flush(self) -> None:
        self.scheduled = False
        data, self.buffer = bytes(self.buffer), bytearray()
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return  # stdout is gone: nothing sensible left to do with log lines
            view = view[written:]

    def _line(self, method: str, message: bytes | str) -> None:
        self.buffer += message if isinstance(message, bytes) else message.encode()
        self.buffer += b"\n"
        if method in _URGENT or len(self.buffer) >= _MAX_BUFFER:
            self.flush()
            return
        if not self.scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self.scheduled = True
            loop.call_later(FLUSH_SECONDS, self.flush)

    def __getattr__(self, method: str) -> Any:
        # structlog calls logger.<level>(message): every level lands in _line.
        if method.startswith("__"):
            raise AttributeError(method)
        return lambda message: self._line(method, message)


_writer: LineWriter | None = None


def flush_logs() -> None:
    if _writer is not None and _writer.buffer:
        _writer.flush()


def configure_logging(level: str = "info", json: bool = True) -> None:
    global _writer
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o, default=str))
        if json
        else structlog.dev.ConsoleRenderer()
    )
    if json:
        _writer = LineWriter(sys.stdout.fileno())
        atexit.register(flush_logs)
        factory: Any = lambda *_args: _writer  # noqa: E731
    else:
        factory = structlog.PrintLoggerFactory()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
