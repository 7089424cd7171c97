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
import re
import sys
from typing import Any

import orjson
import structlog

from proxy.timestamps import utc_iso

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

    def line(self, method: str, message: bytes | str) -> None:
        self.buffer += message if isinstance(message, bytes) else message.encode()
        self.buffer += b"\n"
        if method in _URGENT:
            self.flush()
        else:
            self._added()

    def whole_line(self, line: bytes) -> None:
        """`line`, its newline included, at a level that is not urgent (the request line).
        Nothing more than an append unless the buffer is full or no flush is scheduled."""
        buffer = self.buffer
        buffer += line
        if not self.scheduled or len(buffer) >= _MAX_BUFFER:
            self._added()

    def _added(self) -> None:
        """Flush a full buffer, else make sure a flush is scheduled."""
        if len(self.buffer) >= _MAX_BUFFER:
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
        return lambda message: self.line(method, message)


_writer: LineWriter | None = None
_processors: list[Any] = []
_renderer: Any = None
_access_fast = False  # JSON lines at level info or below: `log_request` skips structlog


# A library's log message is cut at the first character that can start an interpolated value
# (`%s`, a repr, a formatted tuple): what precedes is the message's fixed wording.
_VALUE_START = re.compile(r"[%:(<{\[\n'\"=]")
_LIBRARY_LOGGERS = ("aiohttp", "asyncio")


def safe_message(message: object) -> str:
    """The fixed wording of a log message, without the values it quotes (request bytes, an
    exception's text)."""
    text = message if isinstance(message, str) else type(message).__name__
    return _VALUE_START.split(text, 1)[0].strip()[:120]


class LibraryLogBridge(logging.Handler):
    """aiohttp's and asyncio's stdlib log records as callgate's JSON lines, reduced to the
    message's wording and the exception's class: aiohttp logs a parse error with its text,
    which quotes the request's bytes (an `Authorization` header among them), and asyncio's
    "Exception in callback" quotes the callback's arguments."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name, "message": safe_message(record.msg)}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = type(record.exc_info[1]).__name__
        structlog.get_logger("callgate.library").log(record.levelno, "library_log", **fields)


def _add_timestamp(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["timestamp"] = utc_iso()
    return event


def log_request(
    logger: Any, request_id: str, principal: str | None, fields: dict[str, Any]
) -> None:
    """The one line per request: the same JSON object structlog would write, without its
    processor chain (a third of callgate's logging cost per request).

    Falls back to `logger.info` when the lines are not ours to write (console output, a level
    above info, or a test capturing structlog's events).
    """
    # capture_logs() swaps the processors inside the same list: look at its content.
    if _writer is None or not _access_fast or not _processors or _processors[-1] is not _renderer:
        logger.info("request", **fields)
        return
    # One dict display, keys in the order structlog's processors would add them.
    line = (
        {**fields, "event": "request", "request_id": request_id, "level": "info"}
        if principal is None
        else {
            **fields,
            "event": "request",
            "request_id": request_id,
            "principal": principal,
            "level": "info",
        }
    )
    line["timestamp"] = utc_iso()
    _writer.whole_line(orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE))


def flush_logs() -> None:
    if _writer is not None and _writer.buffer:
        _writer.flush()


def configure_logging(level: str = "info", json: bool = True) -> None:
    global _writer, _processors, _access_fast, _renderer
    _renderer = renderer = (
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
    threshold = logging.getLevelNamesMapping()[level.upper()]
    _processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
        structlog.processors.format_exc_info,
        renderer,
    ]
    _access_fast = json and threshold <= logging.INFO
    structlog.configure(
        processors=_processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    bridge = LibraryLogBridge(threshold)
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [bridge]
        library.setLevel(threshold)
        library.propagate = False  # nothing reaches the root logger's (or Python's last) handler
