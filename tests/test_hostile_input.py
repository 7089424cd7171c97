"""Hostile HTTP input never puts a secret in an answer or a log line.

Each attack goes over a raw loopback socket with its own secret API key in `Authorization` and
in other headers (and, where the attack allows, in the request line and the body): oversized
heads, malformed request lines, header injection, request smuggling, bad chunking, garbage.
Every HTTP-level error must come back in OpenAI's error shape with the right status, nothing
may reach the upstream, and neither the answers nor any line callgate logged (captured from a
real `callgate serve` process, at debug level, with aiohttp's C parser and with its Python
parser, and in-process from structlog and stdlib logging) may contain any of the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from proxy.app import create_app
from proxy.logs import LibraryLogBridge
from proxy.server import make_runner
from tests.conftest import ScriptedUpstream, policy_from
from tests.native_pass import proxy_cli
from tests.test_operations import free_port, wait_http

ERROR_KEYS = {"message", "type", "param", "code"}
PAD = 9000  # past aiohttp's 8,190-byte limit for the request line and each header
SERVER = {"max_body_bytes": 1024, "header_timeout": 1, "shutdown_grace": 2}


def head(secret: str, start: str = "GET /v1/models HTTP/1.1", *extra: str) -> bytes:
    """A request head carrying `secret` as the API key in the usual places."""
    lines = [
        start,
        "Host: 127.0.0.1",
        f"Authorization: Bearer {secret}",
        f"X-Api-Key: {secret}",
        f"Cookie: session={secret}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(secret: str, path: str, *extra: str) -> bytes:
    return head(secret, f"POST {path} HTTP/1.1", *extra)


@dataclass
class Case:
    name: str
    parts: Callable[[str], list[bytes]]  # what the client sends (pauses between parts)
    statuses: list[int]  # the answers expected, in order (aiohttp's C parser)


CHAT = "/v1/chat/completions"
MODELS = "GET /v1/models HTTP/1.1"


def get(secret: str, *extra: str) -> list[bytes]:
    return [head(secret, MODELS, *extra)]


def chat(secret: str, *extra: str, body: bytes = b"") -> list[bytes]:
    return [post(secret, CHAT, *extra) + body]


def line(secret: str, request_line: str) -> list[bytes]:
    return [head(secret, request_line)]


TE = "Transfer-Encoding: chunked"
CASES = [
    Case("control", lambda s: get(s, "Connection: close"), [200]),
    # Sizes: 431, whichever line is too long.
    Case(
        "oversized_authorization",
        lambda s: [f"{MODELS}\r\nHost: x\r\nAuthorization: Bearer {s}{'x' * PAD}\r\n\r\n".encode()],
        [431],
    ),
    Case("oversized_other_header", lambda s: get(s, "X-Pad: " + "y" * PAD), [431]),
    Case("oversized_header_name", lambda s: get(s, f"X-{s}{'n' * PAD}: v"), [431]),
    Case(
        "oversized_request_line",
        lambda s: line(s, f"GET /v1/models?key={s}&pad={'p' * PAD} HTTP/1.1"),
        [431],
    ),
    Case("too_many_headers", lambda s: get(s, *(f"X-{i}: {s}" for i in range(200))), [431]),
    # Request lines.
    Case("malformed_request_line", lambda s: line(s, f"GET /v1/models?k={s} HTTP/1.1 x"), [400]),
    Case("invalid_method", lambda s: line(s, f"G@T /v1/models?k={s} HTTP/1.1"), [400]),
    Case("lowercase_method", lambda s: line(s, "get /v1/models HTTP/1.1"), [400]),
    Case(
        "http09",
        lambda s: [f"GET /v1/models?k={s}\r\nAuthorization: Bearer {s}\r\n\r\n".encode()],
        [400],
    ),
    Case("http_1_2", lambda s: line(s, "GET /v1/models HTTP/1.2"), [400]),
    Case("http2_preface", lambda s: [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + head(s)], [400]),
    Case("nul_in_target", lambda s: line(s, f"GET /v1/mo\x00dels?k={s} HTTP/1.1"), [400]),
    Case("space_in_target", lambda s: line(s, f"GET /v1/models?k={s} x HTTP/1.1"), [400]),
    # Header injection: CR, LF, NUL in values; broken header syntax.
    Case("nul_in_value", lambda s: get(s, f"X-Inject: {s}\x00evil"), [400]),
    Case("cr_in_value", lambda s: get(s, f"X-Inject: {s}\rX-Evil: 1"), [400]),
    Case("bare_lf", lambda s: get(s, f"X-Inject: {s}\nX-Evil: 1"), [400]),
    Case("space_before_colon", lambda s: get(s, f"Authorization : Bearer {s}"), [400]),
    Case("obs_fold", lambda s: get(s, "X-A: a", f"  Bearer {s}"), [400]),
    Case("no_colon", lambda s: get(s, f"Authorization Bearer {s}"), [400]),
    Case("bad_name_char", lambda s: get(s, f"X(y): {s}"), [400]),
    Case("non_ascii_name", lambda s: get(s, f"X-\xff\xfe: {s}"), [400]),
    Case(
        "no_host",
        lambda s: [f"{MODELS}\r\nAuthorization: Bearer {s}\r\n\r\n".encode()],
        [400],
    ),
    # Smuggling: framings the proxy and the upstream could read differently.
    Case("cl_and_te", lambda s: chat(s, "Content-Length: 5", TE, body=b"0\r\n\r\n"), [400]),
    Case("te_and_cl", lambda s: chat(s, TE, "Content-Length: 5", body=b"0\r\n\r\n"), [400]),
    Case(
        "two_content_lengths",
        lambda s: chat(s, "Content-Length: 1", "Content-Length: 2", body=b"ab"),
        [400],
    ),
    Case(
        "same_content_length_twice",
        lambda s: chat(s, "Content-Length: 2", "Content-Length: 2", body=b"{}"),
        [400],
    ),
    Case("content_length_list", lambda s: chat(s, "Content-Length: 2, 2", body=b"{}"), [400]),
    Case("content_length_negative", lambda s: chat(s, "Content-Length: -1"), [400]),
    Case("content_length_plus", lambda s: chat(s, "Content-Length: +2", body=b"{}"), [400]),
    Case("content_length_hex", lambda s: chat(s, "Content-Length: 0x2", body=b"{}"), [400]),
    Case(
        "te_chunked_then_identity",
        lambda s: chat(s, TE, "Transfer-Encoding: identity", body=b"0\r\n\r\n"),
        [400],
    ),
    Case("te_xchunked", lambda s: chat(s, "Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), [400]),
    Case(
        "te_chunked_comma",
        lambda s: chat(s, "Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
        [400],
    ),
    Case(
        "te_space_before_colon",
        lambda s: chat(s, "Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
        [400],
    ),
    Case(
        "te_vertical_tab",
        lambda s: chat(s, "Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"),
        [400],
    ),
    Case(
        "te_on_http10",
        lambda s: [head(s, f"POST {CHAT} HTTP/1.0", TE, "Content-Length: 3") + b"0\r\n\r\n"],
        [400],
    ),
    # Chunked bodies.
    Case("bad_chunk_size", lambda s: chat(s, TE, body=f"ZZ\r\n{s}\r\n0\r\n\r\n".encode()), [400]),
    Case(
        "chunk_size_overflow",
        lambda s: chat(s, TE, body=b"F" * 40 + b"\r\n" + s.encode()),
        [400],
    ),
    Case(
        "chunk_without_crlf",
        lambda s: chat(s, TE, body=f"3\r\n{s}\r\n0\r\n\r\n".encode()),
        [400],
    ),
    Case("chunk_bare_lf", lambda s: chat(s, TE, body=b"2\n{}\n0\n\n"), [400]),
    Case(
        "chunk_extension_injection",
        lambda s: chat(s, TE, body=f"2;x={s}\x00\r\n{{}}\r\n0\r\n\r\n".encode()),
        [400],
    ),
    Case(
        "bad_chunk_after_head",
        lambda s: [post(s, CHAT, TE), f"ZZ\r\n{s}\r\n".encode()],
        [400],
    ),
    Case(
        "bad_chunk_after_head_forwarded",
        lambda s: [post(s, "/v1/files", TE) + b"2\r\n{}\r\n", f"ZZ\r\n{s}\r\n".encode()],
        [400],
    ),
    # Not HTTP at all.
    Case("garbage", lambda s: [bytes(range(256)) + s.encode() + b"\r\n\r\n"], [400]),
    Case(
        "tls_client_hello",
        lambda s: [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + s.encode() * 4],
        [400],
    ),
    # Answered by callgate's app, with the key in the headers (and the body).
    Case(
        "body_too_large",
        lambda s: chat(
            s,
            "Content-Type: application/json",
            "Content-Length: 4096",
            "Connection: close",
            body=(s.encode() * 200)[:4096],
        ),
        [413],
    ),
    Case(
        "unknown_expect", lambda s: chat(s, f"Expect: {s}", "Content-Length: 2", body=b"{}"), [417]
    ),
    Case(
        "pipelined_then_malformed",
        lambda s: [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", *get(s, f"X-Inject: {s}\x00")],
        [200, 400],
    ),
]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_answers(data: bytes) -> list[Answer]:
    """The HTTP/1.x responses in `data`, framed by Content-Length (or the end of the data)."""
    answers = []
    while data:
        raw_head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", len(rest)))
        answers.append(Answer(status, headers, rest[:size]))
        data = rest[size:]
    return answers


async def exchange(port: int, parts: list[bytes], timeout: float = 3.0) -> bytes:
    """Send `parts` (0.1 s apart) on a fresh connection; everything read until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.1)
            writer.write(part)
            with contextlib.suppress(ConnectionError):
                await writer.drain()

        async def read_all() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    received.extend(chunk)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read_all(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(received)


def assert_openai_error(answer: Answer) -> None:
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    data = json.loads(answer.body)
    assert set(data) == {"error"}, data
    assert set(data["error"]) == ERROR_KEYS, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert data["error"]["type"] in {"invalid_request_error", "server_error", "upstream_error"}


def make_secret() -> str:
    return f"sk-SECRET{secrets.token_hex(8)}"


async def attack(port: int, *, strict: bool = True) -> tuple[dict[str, str], dict[str, bytes]]:
    """Every case at once, each on its own connection: (secret per case, raw answer per case).
    `strict`: the statuses are the C parser's; otherwise any error status will do."""
    keys = {case.name: make_secret() for case in CASES}
    raws = await asyncio.gather(*(exchange(port, case.parts(keys[case.name])) for case in CASES))
    answers = dict(zip((c.name for c in CASES), raws, strict=True))
    for case in CASES:
        raw = answers[case.name]
        for key in keys.values():
            assert key.encode() not in raw, f"{case.name}: a key in the answer: {raw[:300]!r}"
        parsed = parse_answers(raw)
        if strict:
            assert [a.status for a in parsed] == case.statuses, (case.name, raw[:300])
        # aiohttp's Python parser (its fallback) is laxer: it takes `get` and HTTP/1.2, waits
        # for more of a head it would reject (callgate's head timeout answers 408) or for the
        # rest of a chunk it cannot get (no answer); its statuses are not checked.
        for answer in parsed:
            if answer.status >= 400:
                assert_openai_error(answer)
    return keys, answers


def assert_no_key(keys: dict[str, str], text: str, where: str) -> None:
    for name, key in keys.items():
        assert key not in text, f"{where}: the key of case {name} was logged"
        assert key[len("sk-SECRET") :] not in text, f"{where}: part of the key of {name}"


def config(upstream: ScriptedUpstream) -> dict[str, Any]:
    return {
        "upstream": {"base_url": upstream.url},
        "audit": {"log": True},
        "server": SERVER,
    }


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_callgate_serve_leaks_no_key(
    parser: str, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    upstream.push(*[{"object": "list", "data": []}] * 10)  # the Python parser forwards more
    path = tmp_path / "callgate.yaml"
    path.write_text(yaml.safe_dump(config(upstream)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CALLGATE_UPSTREAM_URL"}
    if parser == "python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *proxy_cli(), "serve", "--config", str(path),
            *("--port", str(port), "--log-level", "debug"),
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz")
        keys, _ = await attack(port, strict=parser == "c")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    logged = out.read_text(errors="replace") + err.read_text(errors="replace")
    assert_no_key(keys, logged, "callgate's output")
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert not err.read_text().strip(), err.read_text()[:2000]  # everything is a JSON line
    # The log is real: the control request's line, and one line per refused request.
    assert any(e.get("event") == "request" and e.get("status") == 200 for e in lines), lines
    errors = [e for e in lines if e.get("event") == "http_error"]
    assert len(errors) >= (len(CASES) - 5 if parser == "c" else 10), lines
    if parser == "c":
        # Nothing but the control request reached the upstream.
        assert [(r.method, r.path) for r in upstream.received] == [("GET", "/v1/models")]


async def test_in_process_runner_leaks_no_key(
    upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, through `make_runner` in this process: structlog's events and every stdlib
    log record (aiohttp's loggers included) are searched."""
    upstream.push({"object": "list", "data": []})
    policy = policy_from(config(upstream), upstream.url)
    app = create_app(policy)
    runner = make_runner(app, policy.config.server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    caplog.set_level(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as events:
            keys, _ = await attack(port)
    finally:
        await runner.cleanup()
    assert_no_key(keys, repr(events), "structlog")
    formatter = logging.Formatter("%(name)s %(message)s")
    stdlib = "\n".join(formatter.format(r) for r in caplog.records)
    assert_no_key(keys, stdlib, "stdlib logging")
    assert any(e["event"] == "http_error" and e["status"] == 431 for e in events), events
    assert runner.guard.active == 0  # every connection was closed and counted out


def test_library_log_records_keep_only_their_wording() -> None:
    """What `callgate serve` does with aiohttp's and asyncio's stdlib records: the wording
    before any interpolated value, and the exception's class, never its text."""
    key = make_secret()
    exc = LineTooLong(f"Bearer {key}".encode(), 8190)
    records = [
        ("aiohttp.server", "Error handling request from %s", (key,), exc),
        ("asyncio", f"Exception in callback RequestHandler.data_received(b'{key}')", (), None),
        (
            "asyncio",
            f"Task exception was never retrieved\nfuture: <Task exception={key!r}>",
            (),
            exc,
        ),
    ]
    with structlog.testing.capture_logs() as events:
        for name, msg, args, error in records:
            record = logging.LogRecord(
                name, logging.ERROR, __file__, 1, msg, args,
                (type(error), error, None) if error else None,
            )  # fmt: skip
            LibraryLogBridge().emit(record)
    assert_no_key({"bridge": key}, repr(events), "the bridge")
    assert [(e["logger"], e["message"], e.get("error")) for e in events] == [
        ("aiohttp.server", "Error handling request from", "LineTooLong"),
        ("asyncio", "Exception in callback RequestHandler.data_received", None),
        ("asyncio", "Task exception was never retrieved", "LineTooLong"),
    ]
