"""Responses written the way aiohttp writes them, without its general path.

aiohttp sends a response through `prepare()` (signals, compression, chunking, a payload
writer), its headers buffered in a `StreamWriter`, then `write()` / `write_eof()`. For what
callgate answers most, that path costs more CPU than the gates: a whole body in memory (every
non-streaming answer) and a gated event stream. Measured A/B with `bench.loadgen` (the heavy
policy on Redis, CPU per request): non-streaming 223 -> 204 µs.

`plain()` says whether a `web.Response` can skip it and `encode()` renders it; `stream_head()`
renders a stream's head (chunked) for `proxy.stream_response`, which frames the chunks. The
bytes are aiohttp's own: the same status line and headers (`Content-Length` or
`Transfer-Encoding: chunked`, `Content-Type` for a body, `Date`, `Server`, `Connection: close`
when the connection ends), the same refusal of a header holding a control character (aiohttp's
serializer does that check), the same chunk framing. tests/test_http_answer.py compares them
with aiohttp's path byte for byte. One difference, on purpose: a whole body is always sent with
its own length as Content-Length, where aiohttp keeps a Content-Length a handler set even when
the body's length differs (callgate's handlers never set one: `upstream.response_headers`
drops the upstream's).

Anything else (HEAD, a status without a body, compression, cookies, a Payload body, a stream
with a Content-Length, HTTP/1.0, an app with `on_response_prepare` handlers) takes aiohttp's
path as before.
"""

from __future__ import annotations

from typing import cast

from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import _serialize_headers  # C-accelerated; rejects control chars

__all__ = ["encode", "plain", "stream_head"]


def _own_path(request: web.BaseRequest, resp: web.StreamResponse) -> bool:
    """False when only aiohttp's path renders `resp` as aiohttp would."""
    if resp._payload_writer is not None or resp._eof_sent:
        return False
    if resp._compression or resp._chunked or resp._cookies:
        return False
    status = resp._status
    if status < 200 or status == 204 or status == 304:
        return False  # bodiless by definition: aiohttp's rules for their headers apply
    if request.method == hdrs.METH_HEAD or request.version != HttpVersion11:
        return False
    match_info = getattr(request, "_match_info", None)  # a web.Request's: its apps
    if match_info is not None:
        for app in match_info.apps:
            if app.on_response_prepare:
                return False
    return True


def _head(request: web.BaseRequest, resp: web.StreamResponse) -> bytes:
    headers = resp._headers
    keep_alive = resp._keep_alive
    if keep_alive is None:
        keep_alive = resp._keep_alive = request.keep_alive
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    if not keep_alive and hdrs.CONNECTION not in headers:
        headers[hdrs.CONNECTION] = "close"
    head: bytes = _serialize_headers(f"HTTP/1.1 {resp._status} {resp._reason}", headers)
    return head


def plain(request: web.BaseRequest, resp: web.StreamResponse) -> bool:
    """True when `resp` is a whole body in memory that `encode()` renders as aiohttp would."""
    if type(resp) is not web.Response:
        return False
    body = resp._body
    if body is not None and type(body) is not bytes:
        return False  # a Payload (file, stream, ...) writes itself
    return _own_path(request, resp)


def encode(request: web.BaseRequest, resp: web.Response) -> bytes:
    """The response's bytes (given `plain()`); marks it sent, as `write_eof()` would."""
    body = cast(bytes, resp._body or b"")  # plain(): bytes or None
    headers = resp._headers
    # Always the body's length: a Content-Length a handler copied from elsewhere cannot
    # disagree with what is sent.
    headers[hdrs.CONTENT_LENGTH] = str(len(body))
    if body:
        headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    head = _head(request, resp)
    resp._eof_sent = True  # `prepared` from here on; a second write_eof() is a no-op
    resp._body_length = len(body)
    return head + body if body else head


def stream_head(request: web.BaseRequest, resp: web.StreamResponse) -> bytes | None:
    """The head of `resp` as a chunked stream, as aiohttp's `prepare()` would write it; None
    when aiohttp's path must run (see the module docstring)."""
    if not _own_path(request, resp) or hdrs.CONTENT_LENGTH in resp._headers:
        return None
    resp._headers[hdrs.TRANSFER_ENCODING] = "chunked"
    resp._headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    return _head(request, resp)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body, framed as aiohttp frames it."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
