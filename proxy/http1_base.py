"""The parts of `proxy.http1` that hold no connection (it re-exports the public names).

Where requests go (`Origin`) and a request's bytes (`encode_request`); the bounds on an
upstream answer (`upstream.max_*`, `Limits`) and the exceptions raised when one is passed
(aiohttp's types, so the routes handle both clients the same way); and a gzip/deflate decoder
that inflates at most what the bound still allows; and `Chunks`, what `iter_any()` returns.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import aiohttp

# Decoded bytes below which the decompression ratio is not checked: small bodies (a short
# repetitive answer, an error) can inflate far more than JSON does, and cost nothing.
RATIO_FLOOR = 1 << 20
# Compressed bytes decoded at a time: the ratio bound lets each piece inflate by at most the
# ratio, so one large read of a bomb cannot decode to ratio x 256 KiB before it is checked.
DECODE_SLICE = 16 << 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN = str.maketrans("", "", "\r\n")


class Origin:
    """Where requests go: scheme, host and port, and the `Host` header they carry."""

    __slots__ = ("host", "host_header", "port", "scheme", "tls")

    def __init__(self, scheme: str, host: str, port: int | None) -> None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported URL scheme {scheme!r} (http or https)")
        self.scheme = scheme
        self.host = host
        self.port = port or _DEFAULT_PORTS[scheme]
        self.tls = scheme == "https"
        name = f"[{host}]" if ":" in host else host
        default = self.port == _DEFAULT_PORTS[scheme]
        self.host_header = name if default else f"{name}:{self.port}"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def encode_request(
    origin: Origin,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
) -> bytes:
    """A request's head and body, as the one write that sends them."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        # aiohttp's server never lets CR or LF into a header; the configured key might.
        text = "".join(
            f"{name.translate(_FORBIDDEN)}: {value.translate(_FORBIDDEN)}\r\n"
            for name, value in headers
        )
    length = ""
    if body is not None or method in ("POST", "PUT", "PATCH"):
        length = f"Content-Length: {len(body) if body else 0}\r\n"
    head = f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n{text}{length}\r\n"
    # aiohttp's server decodes header bytes as UTF-8 with surrogateescape: this sends the
    # client's bytes back out unchanged.
    data = head.encode("utf-8", "surrogateescape")
    if body:
        data += body
    return data


class BoundExceeded(aiohttp.ClientPayloadError):
    """The upstream's answer passed a size bound (`bound` names the setting)."""

    def __init__(self, message: str, bound: str) -> None:
        super().__init__(message)
        self.bound = bound


class DeadlinePassed(aiohttp.ServerTimeoutError):
    """The upstream's answer was not complete within `upstream.max_duration`."""

    bound = "max_duration"


class Limits:
    """The bounds on one answer, and what is told when one is passed (e.g. a metric)."""

    __slots__ = ("max_bytes", "max_duration", "max_ratio", "on_exceeded")

    def __init__(
        self,
        max_bytes: int = 64 << 20,
        max_ratio: float = 100.0,
        max_duration: float = 1800.0,
        on_exceeded: Callable[[str], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_ratio = max_ratio
        self.max_duration = max_duration
        self.on_exceeded = on_exceeded

    def exceeded(self, bound: str) -> None:
        if self.on_exceeded is not None:
            self.on_exceeded(bound)


DEFAULT_LIMITS = Limits()


class Decoder:
    """Content-Encoding gzip or deflate, decoded as the body arrives."""

    def __init__(self, encoding: str) -> None:
        # 32 + MAX_WBITS: a zlib or gzip header, detected; raw deflate is tried on failure.
        self.encoding = encoding
        self.inner = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self.started = False

    def feed(self, data: bytes | memoryview, limit: int) -> bytes:
        """What `data` decodes to, but at most `limit` + 1 bytes: more than `limit` means the
        caller's bound is passed (zlib stops there, and the rest is never inflated)."""
        if not self.started and data and self.encoding == "deflate" and data[0] & 0x0F != 8:
            # No zlib header (its first byte names method 8): raw deflate. Decided on the
            # first byte, as zlib may accept a lone first byte before it checks the header.
            self.inner = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = self.inner.decompress(data, limit + 1)
        except zlib.error:
            if self.started or self.encoding != "deflate":
                raise
            # Some servers send "deflate" without the zlib wrapper.
            self.inner = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self.inner.decompress(data, limit + 1)
        self.started = True
        return out

    def flush(self) -> bytes:
        tail = self.inner.flush()
        if self.started and not self.inner.eof:
            raise zlib.error("compressed body ends early")
        return tail


class Body(Protocol):
    def next_chunk(self) -> Awaitable[bytes | None]: ...


class Chunks:
    """`Response.iter_any()`: the body's chunks as they arrive (a class, not an async
    generator, which mypyc does not compile: proxy.native)."""

    def __init__(self, body: Body) -> None:
        self._body = body

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        data = await self._body.next_chunk()
        if data is None:
            raise StopAsyncIteration
        return data
