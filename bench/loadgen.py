"""The load generator: a fixed number of keep-alive connections, each sending one request after
another for a fixed time; prints one JSON object with throughput and latency percentiles.

    python -m bench.loadgen --url http://127.0.0.1:9001/v1/chat/completions \\
        --concurrency 32 --duration 5 --warmup 1 [--stream] [--loop uvloop]

The HTTP/1.1 client is a small asyncio Protocol (Content-Length and chunked bodies): it costs far
less CPU per request than a general-purpose client, which matters when the load generator shares
two cores with the servers it measures. Every answer is checked (status 200, the tool call in a
completion, `[DONE]` at the end of a stream); anything else counts as an error. Time to first
byte is the time until the first byte of the response body.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import cast
from urllib.parse import urlsplit

import orjson

from bench.common import TOOL, chat_request, run

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _DONE = range(6)


class BadResponse(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.body = bytearray()
        self.fut: asyncio.Future[None] | None = None
        self.state = _DONE
        self.status = 0
        self.remaining = 0
        self.keep_alive = True
        self.first_byte = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(f"connection closed: {exc}"))

    def send(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.state = _HEAD
        self.body.clear()
        self.first_byte = 0.0
        self.transport.write(request)
        return self.fut

    def data_received(self, data: bytes) -> None:
        if self.state not in (_HEAD, _DONE) and not self.first_byte:
            self.first_byte = time.perf_counter()
        self.buf += data
        try:
            self._parse()
        except Exception as exc:  # a malformed answer: fail this request, drop the connection
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(BadResponse(f"unparseable response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def _finish(self) -> None:
        self.state = _DONE
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                self.status = int(head[0].split(" ", 2)[1])
                length, chunked = None, False
                self.keep_alive = True
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "transfer-encoding" and "chunked" in value.lower():
                        chunked = True
                    elif name == "connection" and "close" in value.lower():
                        self.keep_alive = False
                if buf:
                    self.first_byte = time.perf_counter()
                if chunked:
                    self.state = _CHUNK_SIZE
                elif length is not None:
                    self.state, self.remaining = _BODY, length
                    if length == 0:
                        self._finish()
                        return
                else:
                    raise BadResponse("neither Content-Length nor chunked")
            elif self.state == _BODY:
                take = min(len(buf), self.remaining)
                self.body += buf[:take]
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self._finish()
                return
            elif self.state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.state, self.remaining = _CHUNK_DATA, size
            elif self.state == _CHUNK_DATA:
                if len(buf) < self.remaining + 2:
                    return
                self.body += buf[: self.remaining]
                del buf[: self.remaining + 2]
                self.state = _CHUNK_SIZE
            elif self.state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish()
                    return
            else:
                return


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile in milliseconds (nearest rank), None without samples."""
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx] * 1000.0


async def measure(
    url: str,
    stream: bool,
    concurrency: int,
    duration: float,
    warmup: float,
    principals: int,
    prefix: str = "bench-user-",
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = chat_request(stream)
    expect = b"data: [DONE]" if stream else f'"name":"{TOOL}"'.encode()

    def request_bytes(principal: str) -> bytes:
        return (
            f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\n"
            "Authorization: Bearer sk-bench-not-a-real-key\r\n"
            f"X-Callgate-Principal: {principal}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: dict[str, int] = {}
    total = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def connect() -> Connection:
        _, conn = await loop.create_connection(Connection, host, port)
        return conn

    async def worker(n: int) -> None:
        nonlocal total
        req = request_bytes(f"{prefix}{n % principals}")
        conn = await connect()
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    await conn.send(req)
                except (ConnectionError, BadResponse) as exc:
                    error(type(exc).__name__)
                    conn = await connect()
                    continue
                t1 = time.perf_counter()
                total += 1
                ok = conn.status == 200 and expect in conn.body
                if t_measure <= t1 <= t_end:
                    if ok:
                        latencies.append(t1 - t0)
                        ttfbs.append((conn.first_byte or t1) - t0)
                    else:
                        error(f"status {conn.status}" if conn.status != 200 else "bad body")
                if not conn.keep_alive or conn.closed:
                    if conn.transport is not None:
                        conn.transport.close()
                    conn = await connect()
        finally:
            if conn.transport is not None:
                conn.transport.close()

    tasks = [asyncio.create_task(worker(n)) for n in range(concurrency)]
    # Bounded: whatever is still running a while after the end is cancelled and counted.
    done, pending = await asyncio.wait(tasks, timeout=warmup + duration + 10)
    for task in pending:
        task.cancel()
        error("timeout")
    for task in done:
        if task.exception() is not None:
            error(f"worker: {task.exception()!r}"[:120])
    latencies.sort()
    ttfbs.sort()
    return {
        "url": url,
        "stream": stream,
        "concurrency": concurrency,
        "duration": duration,
        "requests": len(latencies),
        "total_requests": total,
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 0.50),
        "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": percentile(latencies, 1.0),
        "ttfb_p50_ms": percentile(ttfbs, 0.50),
        "ttfb_p99_ms": percentile(ttfbs, 0.99),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--principals", type=int, default=32)
    parser.add_argument("--principal-prefix", default="bench-user-")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    result: dict[str, object] = {}

    async def go() -> None:
        result.update(
            await measure(
                args.url,
                args.stream,
                args.concurrency,
                args.duration,
                args.warmup,
                args.principals,
                args.principal_prefix,
            )
        )

    run(go, args.loop)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
