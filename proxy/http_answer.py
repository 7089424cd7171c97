"""A whole response in memory, written as one piece: what most of callgate's answers are.

aiohttp sends a `web.Response` through its general path: `prepare()` (signals, compression,
chunking, a payload writer), the headers buffered in a `StreamWriter`, then `write_eof()` with
the body. For a body already in memory that path costs about 20 µs of CPU per request (measured
A/B with `bench.loadgen`, the heavy policy on Redis: 223 -> 204 µs per request), more than
callgate's gates take. `plain()` says whether a response can skip it, and `encode()` renders
it the way aiohttp would have: the same status line, the same headers (`Content-Length`,
`Content-Type` for a body, `Date`, `Server`, `Connection: close` when the connection ends), the
same refusal of a header holding CR or LF (aiohttp's own serializer does that check).

Anything else (a stream, HEAD, a status without a body, compression, cookies, a Payload body,
HTTP/1.0, an app with `on_response_prepare` handlers) takes aiohttp's path as before.
"""

from __future__ import annotations

from typing import cast

from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import _serialize_headers  # C-accelerated; rejects CR/LF in headers

__all__ = ["encode", "plain"]


def plain(request: web.BaseRequest, resp: web.StreamResponse) -> bool:
    """True when `resp` is a whole body in memory that aiohttp would send unchanged."""
    if type(resp) is not web.Response or resp._payload_writer is not None or resp._eof_sent:
        return False
    body = resp._body
    if body is not None and type(body) is not bytes:
        return False  # a Payload (file, stream, ...) writes itself
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


def encode(request: web.BaseRequest, resp: web.Response) -> bytes:
    """The response's bytes (given `plain()`); marks it sent, as `write_eof()` would."""
    body = cast(bytes, resp._body or b"")  # plain(): bytes or None
    headers = resp._headers
    keep_alive = resp._keep_alive
    if keep_alive is None:
        keep_alive = resp._keep_alive = request.keep_alive
    # Always the body's length: a Content-Length a handler copied from elsewhere cannot
    # disagree with what is sent.
    headers[hdrs.CONTENT_LENGTH] = str(len(body))
    if body:
        headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    if not keep_alive and hdrs.CONNECTION not in headers:
        headers[hdrs.CONNECTION] = "close"
    head: bytes = _serialize_headers(f"HTTP/1.1 {resp._status} {resp._reason}", headers)
    resp._eof_sent = True  # `prepared` from here on; a second write_eof() is a no-op
    resp._body_length = len(body)
    return head + body if body else head
