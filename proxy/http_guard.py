"""The client side of the HTTP/1.1 server: protocol errors, slow clients, too many connections.

aiohttp answers a request it cannot parse (a header over 8,190 bytes, a NUL in a header value,
Content-Length with Transfer-Encoding, ...) itself, before any middleware runs: a text/plain
400 whose body is the parser's message, and that message quotes the offending bytes (the first
100 bytes of an oversized `Authorization` header are the API key). It logs the same text with a
traceback. `GuardedRequestHandler`, aiohttp's per-connection protocol with `handle_error`
replaced, answers these in OpenAI's error shape (431 for a head too large, 400 otherwise)
with a fixed message that quotes nothing from the request, and logs the error's class only.

It also bounds what a client can hold:
- a request head must be complete within `header_timeout` seconds of the connection opening,
  or of its first byte on a kept-alive connection (else 408, or a silent close if nothing came);
- an idle kept-alive connection closes after `idle_timeout` (aiohttp's `keepalive_timeout`);
- past `max_connections` open connections, a new one gets a 503 in OpenAI's shape and is
  closed (clients retry a 503); the open ones are served as before.

The timers cost nothing per request when a request head arrives in one read: one timer per
connection, and one more only for a head that arrives in pieces.

`GuardedAppRunner` is `web.AppRunner` serving through this protocol; `proxy.server.run` uses it.
"""

from __future__ import annotations

import asyncio
import re
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from proxy import http_answer
from proxy.errors import error_body, error_response
from proxy.logs import safe_message

log = structlog.get_logger("callgate.http")

# How long a refused connection may keep sending (read and dropped) after its 503: closing a
# socket with unread input makes the kernel send a reset, which can destroy the 503 before the
# client reads it.
REFUSAL_LINGER = 1.0

# llhttp's own reason for an error ("Invalid header value char", "Duplicate Content-Length")
# comes before the quoted bytes in aiohttp's message: `<reason>:\n\n  b'<bytes>'\n  ^`. Only
# that static prefix is kept, and only when the message has exactly this shape.
_LLHTTP_REASON = re.compile(r"(?:Bad status line:\n  )?([A-Za-z][^\n]{0,99}):\n\n  b['\"]")
_TOO_MANY_HEADERS = "Too many headers received"
# aiohttp's messages that quote nothing, passed on as they are.
_FIXED_MESSAGES = frozenset(
    (
        "Missing 'Host' header in request.",
        "Data after `Connection: close`",
        "Bad line ending, expected CRLF",
        "Request has invalid `Transfer-Encoding`",
        "Transfer-Encoding can't be present with Content-Length",
        "Too many trailers received",
    )
)

# (class, HTTP status, code, message); the first class the error is an instance of wins.
_PROTOCOL_ERRORS: tuple[tuple[type[Exception], int, str, str], ...] = (
    (
        LineTooLong,
        431,
        "request_header_fields_too_large",
        "Request header fields too large: the request line and each header must fit in {limit} "
        "bytes",
    ),
    (BadHttpMethod, 400, "invalid_http_method", "Invalid HTTP method"),
    (BadStatusLine, 400, "malformed_request_line", "Malformed request line"),
    (InvalidURLError, 400, "invalid_request_target", "Invalid request target"),
    (InvalidHeader, 400, "invalid_header", "Invalid header"),
    (TransferEncodingError, 400, "invalid_transfer_encoding", "Invalid chunked transfer encoding"),
    (ContentLengthError, 400, "invalid_content_length", "Body does not match its Content-Length"),
    (ContentEncodingError, 400, "invalid_content_encoding", "Body does not match its encoding"),
)


def classify(exc: BaseException | None, limit: int) -> tuple[int, str, str]:
    """(status, code, message) for an error aiohttp's parser raised; nothing in it comes from
    the request's bytes."""
    message = getattr(exc, "message", None)
    if message == _TOO_MANY_HEADERS:
        return 431, "request_header_fields_too_large", "Too many request header fields"
    for cls, status, code, text in _PROTOCOL_ERRORS:
        if isinstance(exc, cls):
            return status, code, text.format(limit=limit)
    if message in _FIXED_MESSAGES:
        return 400, "malformed_http_request", f"Malformed HTTP request: {message}"
    detail = _LLHTTP_REASON.match(message) if isinstance(message, str) else None
    if detail is not None:
        return 400, "malformed_http_request", f"Malformed HTTP request: {detail.group(1)}"
    return 400, "malformed_http_request", "Malformed HTTP request"


def _canned(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A whole response, written to the socket without aiohttp's machinery (no request)."""
    body = error_body(message, "invalid_request_error" if status < 500 else "server_error", code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


HEAD_TIMEOUT_RESPONSE = _canned(
    408, "Request Timeout", "request_timeout", "The request head did not arrive in time"
)
REFUSED_RESPONSE = _canned(
    503,
    "Service Unavailable",
    "too_many_connections",
    "callgate has too many open connections; retry shortly",
    "Retry-After: 1\r\n",
)


@dataclass(slots=True)
class ConnectionGuard:
    """One per listening server: its limits, and what its connections did to them."""

    header_timeout: float
    max_connections: int
    active: int = 0  # connections being served
    refused: int = 0  # answered 503 because `active` was at `max_connections`
    head_timeouts: int = 0  # closed because a request head did not arrive in time


class Refusal(asyncio.Protocol):
    """A connection past the bound: a 503, then whatever the client still sends is dropped
    until it closes (or `REFUSAL_LINGER` passes)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(REFUSED_RESPONSE)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self.timer.cancel()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol, with protocol errors in OpenAI's shape, a request-head timeout and
    the connection bound (see the module docstring)."""

    __slots__ = ("_guard", "_head_started", "_head_timer")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # some bytes of the awaited request head have arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.active >= guard.max_connections:
            guard.refused += 1
            # From here on the transport talks to the refusal: this handler never starts.
            # (A cast, not an isinstance check: uvloop's transports are not asyncio's classes.)
            stream = cast(asyncio.Transport, transport)
            stream.set_protocol(Refusal(stream))
            return
        guard.active += 1
        super().connection_made(transport)
        # The first request head is timed from the connection's start: a client that connects
        # and sends nothing is gone after `header_timeout`, not after the idle timeout.
        self._head_timer = self._loop.call_later(guard.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.active -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            # A head is complete (or failed to parse, which is answered at once).
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._head_started = False
            if self._current_request is not None:
                self._fail_body_in_flight(self._current_request)
            return
        if not data:
            return
        if self._head_timer is None:
            # Bytes while the connection waits for its next request start a head; other bytes
            # are the body of the request being handled.
            waiter = self._waiter
            if waiter is None or waiter.done():
                return
            self._head_timer = self._loop.call_later(
                self._guard.header_timeout, self._head_timed_out
            )
        self._head_started = True

    def _fail_body_in_flight(self, request: web.BaseRequest) -> None:
        """A parse error in the body the handler is reading (bad chunking): aiohttp queues it
        as the next request's error and never ends the body, so the handler would wait for the
        client to leave. The body raises a 400 instead, which callgate's middleware answers in
        OpenAI's shape, and the connection closes after it."""
        message = self._messages[-1][0] if self._messages else None
        body = request.content
        if isinstance(message, RawRequestMessage) or body.is_eof():
            return  # a new request, or the error is in a pipelined head after a whole body
        self._messages.pop()
        exc = getattr(message, "exc", None)
        status, code, text = classify(exc, max(self.max_line_size, self.max_field_size))
        log.info(
            "http_error", status=status, code=code, error=type(exc).__name__, peer=request.remote
        )
        if body.exception() is None:  # aiohttp's Python parser may have set one already
            body.set_exception(web.HTTPBadRequest(reason=text))
        body.feed_eof()  # nothing more to read: aiohttp skips its lingering read of the rest
        self.close()

    def _head_timed_out(self) -> None:
        # Cancelled whenever a head completes, so firing means the awaited head is incomplete.
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        self._guard.head_timeouts += 1
        if self._head_started:
            transport.write(HEAD_TIMEOUT_RESPONSE)
        log.info(
            "http_error",
            status=408,
            code="request_timeout",
            peer=_peer(transport),
            bytes_received=self._head_started,
        )
        self.force_close()  # closes once the 408 is flushed

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (status 400, `message` is the
        parser's text quoting the request) or whose handler failed outside any middleware.
        `message` and the exception's text are never used: they can hold request bytes."""
        if request.writer.output_size > 0:
            # As aiohttp: part of a response went out, the connection can only be dropped.
            raise ConnectionError("response already started; cannot send an error")
        if status < 500:
            status, code, text = classify(exc, max(self.max_line_size, self.max_field_size))
            log.info(
                "http_error",
                status=status,
                code=code,
                error=type(exc).__name__,
                peer=request.remote,
            )
            resp = error_response(status, text, "invalid_request_error", code)
        else:
            # 500 (an exception outside the middleware) or 504 (a handler timeout): callgate's
            # own failure. The stack says where; the exception's text stays out of the log.
            log.error(
                "http_handler_error",
                status=status,
                error=type(exc).__name__ if exc is not None else None,
                stack="".join(traceback.format_tb(exc.__traceback__)) if exc else None,
            )
            resp = error_response(
                status, "callgate internal error", "server_error", "internal_error"
            )
        resp.force_close()
        return resp

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, but a whole body in memory goes out in one write (proxy.http_answer)."""
        if self._upgraded or not http_answer.plain(request, resp):
            return await super().finish_response(request, resp, start_time)
        request._finish()
        transport = self.transport
        if transport is None or transport.is_closing():
            return resp, True  # as aiohttp: the client left, nothing to write to
        transport.write(http_answer.encode(request, cast(web.Response, resp)))
        if self.writing_paused:
            # As aiohttp's writer: a slow reader's backlog is drained before the next request.
            try:
                await self._drain_helper()
            except ConnectionError:
                return resp, True
        self.log_access(request, resp, start_time)
        return resp, False

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's "Unhandled exception" and the like: the exception's text can quote the
        request, so only where it happened and the exception's class are logged."""
        exc_info = kw.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else None
        log.error(
            "http_server_error",
            where=safe_message(args[0]) if args else "",
            error=type(exc).__name__ if exc is not None else None,
        )


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


async def _unsupported_version(request: web.BaseRequest) -> web.StreamResponse:
    log.info("http_error", status=400, code="unsupported_http_version", peer=request.remote)
    resp = error_response(
        400,
        "Unsupported HTTP version: use HTTP/1.1",
        "invalid_request_error",
        "unsupported_http_version",
    )
    resp.force_close()
    return resp


async def _expect_guarded(handler: _Handler, request: web.BaseRequest) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # Only the `Expect` check runs outside callgate's middleware, and aiohttp's answer to
        # an unknown expectation quotes the header: keep the status, drop the text.
        log.info("http_error", status=exc.status, code="expectation_failed", peer=request.remote)
        resp = error_response(exc.status, exc.reason, "invalid_request_error")
        resp.force_close()
        return resp


def _checked(handler: _Handler) -> _Handler:
    """What reaches the app's handler outside its middleware. llhttp accepts an HTTP/0.9
    request line (`GET /`), which has no headers and no answer callgate could send through the
    normal path; aiohttp answers an `Expect` it does not know before any middleware runs. A
    plain function, so a request without `Expect` costs no extra coroutine."""

    def checked(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.version.major != 1:
            return _unsupported_version(request)
        if hdrs.EXPECT in request.headers:
            return _expect_guarded(handler, request)
        return handler(request)

    return checked


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making `GuardedRequestHandler`s."""

    def __init__(self, inner: web.Server, guard: ConnectionGuard) -> None:
        # Everything as the server aiohttp built for the app (its handler arguments included).
        super().__init__(
            _checked(inner.request_handler),
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **inner._kwargs,
        )
        self.guard = guard

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose sites serve through `GuardedServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        idle_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("access_log", None)  # callgate writes its own request line
        super().__init__(app, keepalive_timeout=idle_timeout, **kwargs)
        self.guard = ConnectionGuard(header_timeout=header_timeout, max_connections=max_connections)

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.guard)
