"""Bad input anywhere gets a clear error in OpenAI's shape, and the proxy keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import completion

MSGS = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def post_raw(
    url: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-key"}
    hdrs.update(headers or {})
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers=hdrs) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def assert_openai_error(body: bytes, type_: str) -> dict[str, Any]:
    data = json.loads(body)
    assert set(data) == {"error"}
    error = data["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    return error


async def test_malformed_client_json_is_400_for_the_sdk(make_proxy, upstream):
    proxy = await make_proxy({})
    client = proxy.client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.post(
            "/chat/completions",
            cast_to=object,
            content=b'{"model": "m", "messages": [',
            options={"headers": {"Content-Type": "application/json"}},
        )
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error"
    assert "could not parse the JSON body" in err.value.body["message"]
    assert upstream.received == []  # nothing was forwarded


async def test_malformed_client_json_raw_error_shape(make_proxy, upstream):
    proxy = await make_proxy({})
    status, headers, body = await post_raw(f"{proxy.url}/chat/completions", b"{not json")
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert headers["x-callgate-request-id"].startswith("cg-")
    error = assert_openai_error(body, "invalid_request_error")
    assert "JSON" in error["message"]
    assert upstream.received == []


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"a string"', b"42", b"null", b""])
async def test_non_object_json_body_is_400(make_proxy, upstream, payload):
    proxy = await make_proxy({})
    status, _, body = await post_raw(f"{proxy.url}/chat/completions", payload)
    assert status == 400
    assert_openai_error(body, "invalid_request_error")
    assert upstream.received == []


async def test_proxy_keeps_serving_after_bad_input(make_proxy, upstream):
    proxy = await make_proxy({})
    for junk in (b"{", b"[]", b"\xff\xfe"):
        status, _, _ = await post_raw(f"{proxy.url}/chat/completions", junk)
        assert status == 400
    upstream.push(completion(content="still here"))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.content == "still here"


@pytest.mark.parametrize(
    "reply",
    [
        b'{"id": "chatcmpl-1", "choices": [',
        b"<html>Bad Gateway</html>",
        b"[1, 2, 3]",
    ],
)
async def test_malformed_upstream_json_is_502(make_proxy, upstream, reply):
    proxy = await make_proxy({})
    upstream.push(lambda rec: web.Response(body=reply, content_type="application/json"))
    with pytest.raises(openai.InternalServerError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert err.value.status_code == 502
    assert err.value.body["type"] == "upstream_error"
    assert err.value.body["code"] == "upstream_malformed"
    assert "malformed JSON" in err.value.body["message"]
    # The raw shape too.
    upstream.push(lambda rec: web.Response(body=reply, content_type="application/json"))
    status, _, body = await post_raw(
        f"{proxy.url}/chat/completions", json.dumps({"model": "m", "messages": MSGS}).encode()
    )
    assert status == 502
    assert assert_openai_error(body, "upstream_error")["code"] == "upstream_malformed"


async def test_upstream_unreachable_is_502(make_proxy):
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    proxy = await make_proxy({}, upstream_url=dead)
    with pytest.raises(openai.InternalServerError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert err.value.status_code == 502
    assert err.value.body["code"] == "upstream_unreachable"
    assert "upstream unreachable" in err.value.body["message"]
    # Pass-through routes and streaming chat fail the same way.
    with pytest.raises(openai.InternalServerError) as err2:
        await proxy.client().models.list()
    assert err2.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as err3:
        await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    assert err3.value.status_code == 502
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.root}/healthz") as r:
        assert r.status == 200  # still alive


async def test_upstream_timeout_is_504(make_proxy, upstream):
    proxy = await make_proxy({"upstream": {"timeout": 0.2}})

    async def slow(rec: Any) -> dict[str, Any]:
        await asyncio.sleep(2)
        return completion(content="too late")

    upstream.push(slow)
    with pytest.raises(openai.APIStatusError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert err.value.status_code == 504
    assert err.value.body["code"] == "upstream_timeout"


RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for gpt-test",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
UPSTREAM_HEADERS = {
    "retry-after": "7",
    "x-request-id": "req_abc123",
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "7s",
}


def error_reply(status: int, body: dict[str, Any], headers: dict[str, str]) -> Any:
    return lambda rec: web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


async def test_upstream_429_reaches_client_unchanged(make_proxy, upstream):
    proxy = await make_proxy({})
    upstream.push(error_reply(429, RATE_LIMITED, UPSTREAM_HEADERS))
    with pytest.raises(openai.RateLimitError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert err.value.status_code == 429
    assert err.value.body == RATE_LIMITED["error"]
    headers = err.value.response.headers
    for name, value in UPSTREAM_HEADERS.items():
        assert headers[name] == value
    assert err.value.request_id == "req_abc123"
    # Byte for byte on the wire, for the gated route and a pass-through route alike.
    for path, method in (("/chat/completions", "POST"), ("/embeddings", "POST")):
        upstream.push(error_reply(429, RATE_LIMITED, UPSTREAM_HEADERS))
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, proxy.url + path, json={"model": "m", "input": "x"}) as r,
        ):
            assert r.status == 429
            assert json.loads(await r.read()) == RATE_LIMITED
            for name, value in UPSTREAM_HEADERS.items():
                assert r.headers[name] == value


async def test_upstream_400_reaches_client_unchanged(make_proxy, upstream):
    proxy = await make_proxy({})
    body = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    upstream.push(error_reply(400, body, {"x-request-id": "req_400"}))
    with pytest.raises(openai.BadRequestError) as err:
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert err.value.body == body["error"]
    assert err.value.response.headers["x-request-id"] == "req_400"
    assert len(upstream.bodies()) == 1  # no retry, no reprompt


async def test_oversize_body_is_413(make_proxy, upstream):
    proxy = await make_proxy({"server": {"max_body_bytes": 2048}})
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 4096}]})
    status, _, body = await post_raw(f"{proxy.url}/chat/completions", big.encode())
    assert status == 413
    error = assert_openai_error(body, "invalid_request_error")
    assert error["code"] == "request_too_large"
    assert "2048" in error["message"]
    assert upstream.received == []
    with pytest.raises(openai.APIStatusError) as err:
        await proxy.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "y" * 4096}]
        )
    assert err.value.status_code == 413
    # A body under the limit still goes through.
    upstream.push(completion(content="small is fine"))
    ok = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert ok.choices[0].message.content == "small is fine"


async def test_rule_that_raises_blocks_fail_closed(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "tools": {
                "search_web": {
                    "rules": [
                        {"name": "no_pii", "deny_if": 'args.query.lowerAscii().contains("ssn")'}
                    ]
                }
            },
        }
    )
    seen: list[dict[str, Any]] = []
    proxy.state.auditor.listeners.append(seen.append)
    client = proxy.client()
    # No `query` field: the expression cannot be evaluated, so the call is blocked.
    upstream.push(completion(("search_web", {"q": "weather"})))
    result = await client.chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.tool_calls is None
    assert result.choices[0].finish_reason == "stop"
    assert "Policy violation: no_pii (rule error" in result.choices[0].message.content
    # A non-object argument fails closed too.
    upstream.push(completion(("search_web", "[1, 2]")))
    result = await client.chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.tool_calls is None
    assert [(r["gate"], r["reason"]) for r in seen] == [
        ("rules", "rule_error"),
        ("rules", "rule_error"),
    ]
    # The proxy is fine and a well-formed call passes.
    upstream.push(completion(("search_web", {"query": "weather"})))
    ok = await client.chat.completions.create(model="m", messages=MSGS)
    assert ok.choices[0].message.tool_calls[0].function.name == "search_web"


async def test_rule_returning_non_bool_blocks(make_proxy, upstream):
    proxy = await make_proxy(
        {"on_block": "strip", "tools": {"t": {"rules": [{"name": "odd", "deny_if": "args.n"}]}}}
    )
    upstream.push(completion(("t", {"n": 3})))
    result = await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert result.choices[0].message.tool_calls is None
    assert "Policy violation: odd (rule returned" in result.choices[0].message.content
