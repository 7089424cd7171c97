"""Everything under /v1/* except the gated route is forwarded verbatim; health endpoints; logs."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import openai
import orjson
import pytest
import structlog
from aiohttp import web
from yarl import URL

from proxy.app import create_app
from proxy.principal import fingerprint
from tests.conftest import SSE, completion, policy_from

MSGS = [{"role": "user", "content": "hi"}]


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass
class EchoUpstream:
    """An upstream that records requests verbatim (query string, raw body bytes, headers)."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    reply: Callable[[web.Request, Seen], Any] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Seen(
            request.method,
            request.rel_url.raw_path_qs,
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        self.seen.append(rec)
        if self.reply is not None:
            result = self.reply(request, rec)
            if hasattr(result, "__await__"):
                result = await result
            return result
        return web.json_response({"object": "list", "data": []})


@pytest.fixture
async def echo(aiohttp_server: Any) -> EchoUpstream:
    upstream = EchoUpstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    upstream.url = str(server.make_url("/v1"))
    return upstream


async def fetch(
    method: str, url: str, **kw: Any
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_get_models_with_query_string(make_proxy, echo):
    models = {
        "object": "list",
        "data": [{"id": "gpt-test", "object": "model", "created": 1, "owned_by": "me"}],
    }
    echo.reply = lambda req, rec: web.json_response(models)
    proxy = await make_proxy({}, upstream_url=echo.url)
    page = await proxy.client().models.list(extra_query={"limit": "2", "after": "a b/c"})
    assert [m.id for m in page.data] == ["gpt-test"]
    assert echo.seen[0].method == "GET"
    path, _, query = echo.seen[0].path_qs.partition("?")
    assert path == "/v1/models"
    assert parse_qs(query) == {"limit": ["2"], "after": ["a b/c"]}
    # The query string is passed on exactly as the client encoded it.
    raw = "/models?x=%2F&x=2&flag&y=%C3%A9"
    status, _, _ = await fetch("GET", URL(proxy.url + raw, encoded=True))
    assert status == 200
    assert echo.seen[1].path_qs == "/v1" + raw
    # An encoded slash is refused, never forwarded (servers disagree on it: tests/test_paths_*).
    status, _, _ = await fetch("GET", URL(proxy.url + "/files/dir%2Ffile", encoded=True))
    assert status == 400 and len(echo.seen) == 2


async def test_post_embeddings_body_verbatim(make_proxy, echo):
    embedding = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    echo.reply = lambda req, rec: web.json_response(embedding)
    proxy = await make_proxy({}, upstream_url=echo.url)
    result = await proxy.client().embeddings.create(
        model="text-embedding-3-small", input="hello", encoding_format="float"
    )
    assert result.data[0].embedding == [0.25, -0.5]
    assert echo.seen[0].method == "POST" and echo.seen[0].path_qs == "/v1/embeddings"
    assert json.loads(echo.seen[0].body) == {
        "model": "text-embedding-3-small",
        "input": "hello",
        "encoding_format": "float",
    }
    # Odd formatting, key order and even invalid JSON are not ours to touch here.
    for raw in (b'{ "input" :"x",\n  "model":"m" }', b"not json at all"):
        status, _, _ = await fetch(
            "POST", proxy.url + "/embeddings", data=raw, headers={"Content-Type": "text/plain"}
        )
        assert status == 200
        assert echo.seen[-1].body == raw
        assert echo.seen[-1].headers["content-type"] == "text/plain"
        assert echo.seen[-1].headers["content-length"] == str(len(raw))


async def test_delete_and_status_codes(make_proxy, echo):
    def reply(req: web.Request, rec: Seen) -> web.Response:
        if req.method == "DELETE":
            return web.json_response({"id": "file-abc", "object": "file", "deleted": True})
        return web.json_response(
            {
                "error": {
                    "message": "No such file",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=404,
        )

    echo.reply = reply
    proxy = await make_proxy({}, upstream_url=echo.url)
    deleted = await proxy.client().files.delete("file-abc")
    assert deleted.deleted is True
    assert (echo.seen[0].method, echo.seen[0].path_qs) == ("DELETE", "/v1/files/file-abc")
    with pytest.raises(openai.NotFoundError) as err:
        await proxy.client().files.retrieve("file-missing")
    assert err.value.body["message"] == "No such file"
    assert (echo.seen[1].method, echo.seen[1].path_qs) == ("GET", "/v1/files/file-missing")


async def test_response_status_and_headers_kept(make_proxy, echo):
    echo.reply = lambda req, rec: web.Response(
        status=201,
        body=b'{"ok": true}',
        content_type="application/json",
        headers={
            "x-request-id": "req_201",
            "openai-processing-ms": "12",
            "x-ratelimit-remaining-tokens": "999",
            "x-custom": "kept",
        },
    )
    proxy = await make_proxy({}, upstream_url=echo.url)
    status, headers, body = await fetch("POST", proxy.url + "/files", json={"a": 1})
    assert status == 201
    assert body == b'{"ok": true}'
    assert headers["x-request-id"] == "req_201"
    assert headers["openai-processing-ms"] == "12"
    assert headers["x-ratelimit-remaining-tokens"] == "999"
    assert headers["x-custom"] == "kept"
    assert headers["Content-Type"] == "application/json"


async def test_custom_headers_and_authorization_pass_through(make_proxy, echo):
    proxy = await make_proxy({}, upstream_url=echo.url)
    headers = {
        "Authorization": "Bearer sk-client-key",
        "OpenAI-Organization": "org-1",
        "OpenAI-Beta": "assistants=v2",
        "X-Custom-Trace": "trace-42",
        "X-Callgate-Principal": "alice",
    }
    await fetch("GET", proxy.url + "/models", headers=headers)
    seen = echo.seen[0].headers
    assert seen["authorization"] == "Bearer sk-client-key"
    assert seen["openai-organization"] == "org-1"
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["x-custom-trace"] == "trace-42"
    assert "x-callgate-principal" not in seen
    # The SDK's own headers arrive too.
    await proxy.client(default_headers={"X-Callgate-Principal": "bob"}).models.list()
    seen = echo.seen[1].headers
    assert seen["authorization"] == "Bearer sk-test-key"
    assert "x-callgate-principal" not in seen
    assert seen["user-agent"].startswith("AsyncOpenAI/Python")


async def test_server_side_api_key_replaces_client_key(make_proxy, echo, upstream):
    proxy = await make_proxy({"upstream": {"api_key": "sk-server-side"}}, upstream_url=echo.url)
    await fetch(
        "GET",
        proxy.url + "/models",
        headers={"Authorization": "Bearer sk-client-key", "api-key": "azure-style-key"},
    )
    seen = echo.seen[0].headers
    assert seen["authorization"] == "Bearer sk-server-side"
    assert "api-key" not in seen
    # The gated route does the same.
    echo.reply = lambda req, rec: web.json_response(completion(content="ok"))
    result = await proxy.client().chat.completions.create(
        model="m", messages=MSGS, extra_headers={"X-Callgate-Principal": "carol"}
    )
    assert result.choices[0].message.content == "ok"
    assert echo.seen[1].headers["authorization"] == "Bearer sk-server-side"
    assert "x-callgate-principal" not in echo.seen[1].headers


async def test_chat_route_forwards_headers_without_principal(make_proxy, upstream):
    proxy = await make_proxy({})
    upstream.push(completion(content="ok"))
    await proxy.client().chat.completions.create(
        model="m",
        messages=MSGS,
        extra_headers={"X-Callgate-Principal": "dave", "X-Trace": "t1"},
    )
    headers = {k.lower(): v for k, v in upstream.received[0].headers.items()}
    assert headers["authorization"] == "Bearer sk-test-key"
    assert headers["x-trace"] == "t1"
    assert "x-callgate-principal" not in headers


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-test",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


async def test_streaming_chat_is_forwarded(make_proxy, upstream):
    proxy = await make_proxy({})
    events = [
        chunk({"role": "assistant", "content": ""}),
        *[chunk({"content": word}) for word in ("Hello", ", ", "world")],
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, finish="tool_calls"),
    ]
    upstream.push(SSE(events))
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    text, args, finish, name = "", "", None, None
    async for ch in stream:
        delta = ch.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            name = call.function.name or name
            args += call.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert text == "Hello, world"
    assert (name, json.loads(args), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    assert upstream.bodies()[0]["stream"] is True
    # Raw bytes: text deltas arrive exactly as sent (and as they come), [DONE] included.
    text_events = [*events[:4], chunk({}, finish="stop")]
    upstream.push(SSE(text_events))
    status, headers, body = await fetch(
        "POST",
        proxy.url + "/chat/completions",
        json={"model": "m", "messages": MSGS, "stream": True},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    frames = body.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    assert [json.loads(f.removeprefix(b"data: ")) for f in frames[:-2]] == text_events
    for event in text_events[:4]:  # the text deltas themselves are untouched bytes
        assert b"data: " + json.dumps(event).encode() + b"\n\n" in body


async def test_streaming_upstream_error_passes_unchanged(make_proxy, upstream):
    proxy = await make_proxy({})
    error = {
        "error": {
            "message": "bad model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    upstream.push(
        lambda rec: web.json_response(error, status=404, headers={"x-request-id": "req_s404"})
    )
    with pytest.raises(openai.NotFoundError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    assert err.value.body == error["error"]
    assert err.value.response.headers["x-request-id"] == "req_s404"


async def test_large_streamed_response_body(make_proxy, echo):
    block = bytes(range(256)) * 4096  # 1 MiB
    total = 6

    async def reply(req: web.Request, rec: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(req)
        for _ in range(total):
            await resp.write(block)
        await resp.write_eof()
        return resp

    echo.reply = reply
    proxy = await make_proxy({}, upstream_url=echo.url)
    status, headers, body = await fetch("GET", proxy.url + "/files/file-big/content")
    assert status == 200
    assert headers["Content-Type"] == "application/octet-stream"
    assert len(body) == total * len(block)
    assert hashlib.sha256(body).digest() == hashlib.sha256(block * total).digest()


async def test_large_upload_streams_through(make_proxy, echo):
    # Larger than max_body_bytes: pass-through bodies are streamed, never buffered whole.
    payload = b"0123456789abcdef" * (3 * 65536)  # 3 MiB
    proxy = await make_proxy({"server": {"max_body_bytes": 1024 * 1024}}, upstream_url=echo.url)
    status, _, _ = await fetch(
        "POST",
        proxy.url + "/uploads/upload_1/parts",
        data=payload,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert status == 200
    assert echo.seen[0].body == payload
    assert echo.seen[0].headers["content-length"] == str(len(payload))


async def test_compressed_response_passes_verbatim(make_proxy, echo):
    data = json.dumps({"object": "list", "data": [{"id": "m"}] * 50}).encode()
    packed = gzip.compress(data)
    echo.reply = lambda req, rec: web.Response(
        body=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    proxy = await make_proxy({}, upstream_url=echo.url)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(proxy.url + "/models", headers={"Accept-Encoding": "gzip"}) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == packed
    assert echo.seen[0].headers["accept-encoding"] == "gzip"
    page = await proxy.client().models.list()  # and the SDK decodes it
    assert len(page.data) == 50


async def test_healthz_and_readyz(make_proxy, upstream):
    proxy = await make_proxy({})
    status, _, body = await fetch("GET", proxy.root + "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = await fetch("GET", proxy.root + "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "policy": "<test>"}
    assert upstream.received == []  # health checks never touch the upstream

    async def broken_ping() -> None:
        raise ConnectionError("store down")

    proxy.state.store.ping = broken_ping  # type: ignore[method-assign]
    status, _, body = await fetch("GET", proxy.root + "/readyz")
    assert status == 503
    assert json.loads(body) == {"status": "store unreachable", "error": "store down"}
    status, _, _ = await fetch("GET", proxy.root + "/healthz")
    assert status == 200  # alive, even when not ready
    proxy.state.draining = True
    status, _, body = await fetch("GET", proxy.root + "/readyz")
    assert (status, json.loads(body)["status"]) == (503, "draining")


async def test_unknown_non_v1_path_is_404(make_proxy, upstream):
    proxy = await make_proxy({})
    status, _, body = await fetch("GET", proxy.root + "/admin")
    assert status == 404
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert upstream.received == []


SECRET = "sk-proj-SECRETSECRET-0123456789abcdef"


def rendered(entries: list[dict[str, Any]]) -> str:
    return "\n".join(orjson.dumps(e, default=str).decode() for e in entries)


async def test_api_key_never_logged(make_proxy, upstream, tmp_path):
    audit_file = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        {
            "audit": {"log": True, "file": str(audit_file)},
            "on_block": "strip",
            "tools": {"bad": {"allow": False}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=SECRET, max_retries=0)
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.format_exc_info]
    ) as entries:
        upstream.push(completion(("ok", {"a": 1}), ("bad", {})))
        await client.chat.completions.create(model="m", messages=MSGS)
        upstream.push(completion(content="plain"))
        await client.chat.completions.create(model="m", messages=MSGS)
        upstream.push({"object": "list", "data": []})
        await client.models.list()  # pass-through
        status, _, _ = await fetch(
            "POST",
            proxy.url + "/chat/completions",
            data=b"{",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        assert status == 400
    await proxy.state.auditor.close()
    text = rendered(entries)
    assert SECRET not in text
    assert SECRET[8:24] not in text  # nor a recognizable piece of it
    decisions = [e for e in entries if e["event"] == "tool_call_decision"]
    assert len(decisions) == 2
    assert {e["principal"] for e in decisions} == {fingerprint(SECRET)}
    requests = [e for e in entries if e["event"] == "request"]
    assert len(requests) == 4
    assert all(e["request_id"].startswith("cg-") for e in requests)
    assert fingerprint(SECRET) in text
    # The audit file is clean too.
    audit_text = audit_file.read_text()
    assert SECRET not in audit_text
    assert fingerprint(SECRET) in audit_text
    assert all(upstream_key_ok(r.headers) for r in upstream.received)


def upstream_key_ok(headers: dict[str, str]) -> bool:
    # The key itself does reach the upstream (it is the client's credential).
    return headers.get("Authorization") == f"Bearer {SECRET}"


async def test_upstream_cut_mid_body_cuts_the_client(make_proxy, echo):
    async def reply(req: web.Request, rec: Seen) -> web.StreamResponse:
        if not req.path.endswith("/content"):
            return web.json_response({"object": "list", "data": []})
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 100_000
        await resp.prepare(req)
        await resp.write(b"x" * 1000)
        assert req.transport is not None
        req.transport.close()  # the upstream dies mid-body
        return resp

    echo.reply = reply
    proxy = await make_proxy({}, upstream_url=echo.url)
    with structlog.testing.capture_logs() as entries:
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch("GET", proxy.url + "/files/file-1/content")
    assert any(e["event"] == "upstream_stream_broken" for e in entries)
    status, _, _ = await fetch("GET", proxy.url + "/models")
    assert status == 200  # and the proxy carries on


@contextlib.asynccontextmanager
async def production_server(config: dict[str, Any], upstream_url: str) -> AsyncIterator[str]:
    """callgate served like `callgate serve` does (AppRunner defaults: no handler cancellation
    on client disconnect, unlike aiohttp's TestServer). Yields its /v1 URL."""
    app = create_app(policy_from(config, upstream_url))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_client_gone_mid_stream_is_not_an_upstream_error(echo):
    upstream_done = asyncio.Event()

    async def reply(req: web.Request, rec: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        try:
            for _ in range(1000):  # bounded: about 10 s if nobody stops it
                await resp.write(b"data: " + b"y" * 4096 + b"\n\n")
                await asyncio.sleep(0.01)
        except ConnectionError:
            pass  # callgate hung up on us, as it should once its client is gone
        finally:
            upstream_done.set()
        return resp

    echo.reply = reply
    with structlog.testing.capture_logs() as entries:
        async with production_server({}, echo.url) as url:
            async with aiohttp.ClientSession() as session:
                resp = await session.get(url + "/files/file-1/content")
                await resp.content.readany()
                resp.close()  # the client hangs up mid-stream
            await asyncio.wait_for(upstream_done.wait(), 5)
            for _ in range(300):
                if any(e["event"] == "request" for e in entries):
                    break
                await asyncio.sleep(0.01)
    events = [e["event"] for e in entries]
    assert "client_disconnected" in events
    assert "upstream_stream_broken" not in events
