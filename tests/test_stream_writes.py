"""How a gated stream reaches the client's socket: a stream the upstream sends at once goes out
in one write (headers, events and the end of the body), and a stream whose first bytes are held
still shows the client its headers promptly (proxy.stream_response)."""

from __future__ import annotations

import asyncio
import json
import time
from asyncio import selector_events
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import stream_response
from tests.conftest import SSE, records
from tests.responses_streams import fc, msg, response, stream_events
from tests.streams import chat_stream
from tests.test_approval import TOKEN, Admin

MSGS = [{"role": "user", "content": "hi"}]


def client_writes(monkeypatch: Any, port: int) -> list[bytes]:
    """Every write the proxy makes on the connections its clients opened (its side of them
    is bound to `port`), one entry per transport write."""
    seen: list[bytes] = []
    transport = selector_events._SelectorSocketTransport
    write = transport.write

    def counted(self: Any, data: Any) -> None:
        if self.get_extra_info("sockname")[1] == port:
            seen.append(bytes(data))
        write(self, data)

    def counted_lines(self: Any, lines: Any) -> None:
        counted(self, b"".join(lines))

    monkeypatch.setattr(transport, "write", counted)
    monkeypatch.setattr(transport, "writelines", counted_lines)
    return seen


def all_at_once(events: list[Any]) -> Any:
    """The upstream sends the whole stream with its headers: the proxy reads it at once."""
    body = b"".join(
        e if isinstance(e, bytes) else b"data: " + json.dumps(e).encode() + b"\n\n"
        for e in events
    )
    return lambda _rec: web.Response(body=body, content_type="text/event-stream")


async def test_chat_stream_sent_at_once_is_one_write(make_proxy, upstream, monkeypatch):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    seen = records(proxy)
    writes = client_writes(monkeypatch, proxy.server.port)
    upstream.push(
        all_at_once([*chat_stream(("ok", {"a": 1}), text="Let me check"), b"data: [DONE]\n\n"])
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    text, args = "", ""
    async for ch in stream:
        for choice in ch.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                args += tc.function.arguments or ""
    assert (text, json.loads(args)) == ("Let me check ", {"a": 1})
    assert [(r["tool"], r["decision"]) for r in seen] == [("ok", "allowed")]
    assert len(writes) == 1, [w[:40] for w in writes]
    assert writes[0].startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in writes[0] and writes[0].endswith(b"\r\n0\r\n\r\n")


async def test_responses_stream_sent_at_once_is_one_write(make_proxy, upstream, monkeypatch):
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    writes = client_writes(monkeypatch, proxy.server.port)
    upstream.push(all_at_once(stream_events(response(msg("checking"), fc("ok", {"a": 1})))))
    stream = await proxy.client().responses.create(model="m", input="hi", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    assert [i.type for i in events[-1].response.output] == ["message", "function_call"]
    assert len(writes) == 1, [w[:40] for w in writes]
    assert writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"\r\n0\r\n\r\n")


async def test_blocked_call_in_one_read_reprompts_then_ends_once(make_proxy, upstream, monkeypatch):
    """A reprompt round follows a read sent at once: the client has the first round's bytes
    before the next round starts, and the whole answer is what it would be otherwise."""
    proxy = await make_proxy({"tools": {"bad": {"allow": False}}})
    writes = client_writes(monkeypatch, proxy.server.port)
    release = asyncio.Event()

    async def second_round(_rec: Any) -> web.StreamResponse:
        await release.wait()
        return all_at_once([*chat_stream(text="Sorry"), b"data: [DONE]\n\n"])(_rec)

    upstream.push(
        all_at_once([*chat_stream(("bad", {}), text="Trying"), b"data: [DONE]\n\n"]),
        second_round,
    )
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    text = ""
    async for ch in stream:
        for choice in ch.choices:
            text += choice.delta.content or ""
            assert not choice.delta.tool_calls
        if text == "Trying ":
            release.set()  # the first round reached the client while the second was held
    assert text == "Trying Sorry "
    assert release.is_set()
    assert writes[-1].endswith(b"\r\n0\r\n\r\n") and len(writes) == 2


async def test_headers_go_out_while_the_first_call_is_held(make_proxy, upstream):
    """The first event is a call whose arguments are still streaming in: nothing can be sent
    yet, but the client learns within HEADERS_AFTER that its stream started."""
    proxy = await make_proxy({})
    events = chat_stream(("ok", {"a": 1}), arg_piece=100)  # role, call start, arguments, finish
    upstream.push(SSE(events[1:], delay=1.0))
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            proxy.url + "/chat/completions",
            json={"model": "m", "messages": MSGS, "stream": True},
            headers={"Authorization": "Bearer sk-test-key"},
        ) as resp:
            headers_after = time.monotonic() - started
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            body = await resp.read()
            body_after = time.monotonic() - started
    # The call is complete (and can be sent) only at its finish, two upstream delays in.
    assert body_after >= 2.0
    # Held, the headers would have waited as long; the second upstream event is 1 s in.
    assert headers_after < 1.0, (headers_after, stream_response.HEADERS_AFTER)
    assert b"call_ok_0" in body and body.endswith(b"data: [DONE]\n\n")


def dechunk(raw: bytes) -> bytes:
    """A chunked body, decoded strictly: every chunk framed, the terminator last, nothing after."""
    out, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        pos = end + 2
        if size == 0:
            assert raw[pos:] == b"\r\n", raw[pos - 8 :]
            return b"".join(out)
        out.append(raw[pos : pos + size])
        pos += size
        assert raw[pos : pos + 2] == b"\r\n", raw[pos - 8 : pos + 8]
        pos += 2


async def raw_stream(port: int, path: str, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """POST on a raw socket (HTTP/1.1, Connection: close): the head and the decoded body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + data
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    return head, dechunk(rest)


async def test_gate_crash_after_the_last_read_still_sends_what_was_sent(
    make_proxy, upstream, monkeypatch
):
    """A gate that raises once the last read was handled (a bug: serve_stream ends the stream
    with an internal error event): what that read sent, its allowed call on record, reaches
    the client before the error, as it did when each read was written as it came."""
    from proxy.chat_gate import ChatGate

    def broken(self: Any) -> Any:
        raise RuntimeError("gate bug")

    monkeypatch.setattr(ChatGate, "next_round", broken)
    proxy = await make_proxy({})
    seen = records(proxy)
    upstream.push(
        all_at_once([*chat_stream(("ok", {"a": 1}), ids=["c_ok"]), b"data: [DONE]\n\n"])
    )
    chat = {"model": "m", "messages": MSGS, "stream": True}
    head, body = await raw_stream(proxy.server.port, "/v1/chat/completions", chat)
    assert head.startswith(b"HTTP/1.1 200")
    assert [(r["tool"], r["decision"]) for r in seen] == [("ok", "allowed")]
    events = [e for e in body.split(b"\n\n") if e]
    assert b'"c_ok"' in body and events[-2] == b"data: [DONE]", events[-3:]
    assert json.loads(events[-1][6:])["error"]["code"] == "internal_error"


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_call_read_at_once_is_on_file_before_the_client_has_it(
    make_proxy, upstream, tmp_path, api
):
    """Audit before delivery holds for bytes that wait to go with the end of the body: the
    record of the call they carry is in the file by the time the client reads it, in a stream
    read at once and in a reprompt round that follows one."""
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        {
            "on_block": "reprompt",
            "audit": {"file": str(path), "log": False},
            "tools": {"bad": {"allow": False}},
        }
    )
    if api == "chat":
        url, body = proxy.url + "/chat/completions", {"model": "m", "messages": MSGS}
        upstream.push(
            all_at_once([*chat_stream(("bad", {}), ids=["c_bad"]), b"data: [DONE]\n\n"]),
            all_at_once([*chat_stream(("ok", {"a": 1}), ids=["c_ok"]), b"data: [DONE]\n\n"]),
        )
    else:
        url, body = proxy.url + "/responses", {"model": "m", "input": "hi"}
        upstream.push(
            all_at_once(stream_events(response(msg("no"), fc("bad", {}, "c_bad")))),
            all_at_once(stream_events(response(msg("yes"), fc("ok", {"a": 1}, "c_ok")))),
        )
    async with aiohttp.ClientSession() as s, s.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if b"c_ok" in line:
                on_file = [json.loads(x) for x in path.read_bytes().splitlines()]
                assert "c_ok" in {r.get("call_id") for r in on_file}
                break
        else:
            raise AssertionError("the allowed call was not delivered")
    assert len(upstream.received) == 2  # the call came in the reprompt round


APPROVAL = {
    "on_block": "strip",
    "server": {"admin_token": "${CG_TEST_ADMIN_TOKEN}"},
    "tools": {
        "transfer": {
            "approval": {"when": "args.amount > 100", "ttl": 600, "wait": 3},
            "rate_limit": {"max_calls": 100, "window": 60},
        },
        "lookup": {},
    },
}


async def approving(proxy: Any, answer: bool, first: Any = None) -> Any:
    """An approver that answers the first pending request (the proxy's admin API over HTTP),
    once the headers timer has fired (after calling `first`, if given)."""
    admin = Admin(proxy.root)

    async def approver() -> str:
        for _ in range(200):
            found = await admin.pending()
            if found:
                if first is not None:
                    first()
                await asyncio.sleep(stream_response.HEADERS_AFTER * 2)  # the timer fires first
                act = admin.approve if answer else admin.deny
                assert (await act(found[0]["id"]))[0] == 200
                return str(found[0]["tool"])
            await asyncio.sleep(0.02)
        raise AssertionError("no pending approval appeared")

    return approver


def paying() -> Any:
    events = chat_stream(
        ("lookup", {"q": 1}), ("transfer", {"to": "a", "amount": 500}), text="Paying now"
    )
    return all_at_once([*events, b"data: [DONE]\n\n"])


async def test_headers_by_the_timer_then_the_read_with_the_end(make_proxy, upstream, monkeypatch):
    """A read held for an approver: the headers go alone (the timer), then the read and the
    end of the body in one write, framed: one chunk, then the terminator."""
    monkeypatch.setenv("CG_TEST_ADMIN_TOKEN", TOKEN)
    proxy = await make_proxy(APPROVAL)
    seen = records(proxy)
    writes = client_writes(monkeypatch, proxy.server.port)
    approver = asyncio.create_task((await approving(proxy, True))())
    upstream.push(paying())
    chat = {"model": "m", "messages": MSGS, "stream": True}
    head, body = await raw_stream(proxy.server.port, "/v1/chat/completions", chat)
    assert await approver == "transfer"
    assert head.startswith(b"HTTP/1.1 200")
    assert [(r["tool"], r["decision"]) for r in seen] == [
        ("lookup", "allowed"),
        ("transfer", "allowed"),
    ]
    assert b'"transfer"' in body and body.endswith(b"data: [DONE]\n\n")
    mine = [w for w in writes if b"application/json" not in w]  # not the admin API's
    assert mine[0].startswith(b"HTTP/1.1 200") and mine[0].endswith(b"\r\n\r\n"), mine[0][-40:]
    assert len(mine) == 2 and mine[1].endswith(b"\r\n0\r\n\r\n")


@pytest.mark.parametrize("answer", [True, False])
@pytest.mark.parametrize("leave", ["after_headers", "before_headers"])
async def test_client_leaves_while_the_last_read_waits_for_an_approver(
    make_proxy, upstream, monkeypatch, answer, leave
):
    """The client goes while its stream's only read waits on a decision (having seen the
    headers, or before the timer sent them): the decisions are still recorded, the serve loop
    ends, and the headers timer (firing on a closed connection) raises nothing."""
    if leave == "before_headers":
        monkeypatch.setattr(stream_response, "HEADERS_AFTER", 0.5)  # the client leaves first
    monkeypatch.setenv("CG_TEST_ADMIN_TOKEN", TOKEN)
    loop_errors: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, c: loop_errors.append(c))
    proxy = await make_proxy(APPROVAL)
    seen = records(proxy)
    upstream.push(paying())
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    data = json.dumps({"model": "m", "messages": MSGS, "stream": True}).encode()
    writer.write(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    )
    if leave == "after_headers":
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)  # by the timer
        assert head.startswith(b"HTTP/1.1 200")
    if leave == "after_headers":
        writer.close()
    approver = await approving(proxy, answer, writer.close)
    assert await approver() == "transfer"
    for _ in range(200):
        if proxy.state.streams == 0 and len(seen) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(stream_response.HEADERS_AFTER * 2)
    assert proxy.state.streams == 0
    assert [(r["tool"], r["decision"]) for r in seen] == [
        ("lookup", "allowed"),
        ("transfer", "allowed" if answer else "blocked"),
    ]
    assert loop_errors == []


async def test_client_gone_before_the_upstream_answers_is_not_served(make_proxy, upstream):
    """A client that left while callgate waited for the upstream's answer: nothing is decided
    for it (with headers written at prepare, that write failed and the gate never ran), so its
    stream takes no rate-limit slot and makes no record, even with headers held."""
    proxy = await make_proxy({"tools": {"ok": {"rate_limit": {"max_calls": 1, "window": 60}}}})
    seen = records(proxy)
    answered = asyncio.Event()

    async def slow(rec: Any) -> web.StreamResponse:
        await asyncio.sleep(0.3)  # the client leaves meanwhile
        answered.set()
        return all_at_once([*chat_stream(("ok", {"a": 1})), b"data: [DONE]\n\n"])(rec)

    upstream.push(slow, all_at_once([*chat_stream(("ok", {"a": 2})), b"data: [DONE]\n\n"]))
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    data = json.dumps({"model": "m", "messages": MSGS, "stream": True}).encode()
    writer.write(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    )
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.wait_for(answered.wait(), 5)
    for _ in range(100):
        if proxy.state.streams == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert seen == []
    # The one slot is still free: the next stream's call passes.
    stream = await proxy.client().chat.completions.create(model="m", messages=MSGS, stream=True)
    names = [
        tc.function.name
        async for ch in stream
        for choice in ch.choices
        for tc in choice.delta.tool_calls or []
        if tc.function and tc.function.name
    ]
    assert names == ["ok"]
    assert [(r["tool"], r["decision"]) for r in seen] == [("ok", "allowed")]
