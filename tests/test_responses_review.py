"""Review findings in the Responses API gate: upstream errors mid-stream, error-mode refunds,
timeouts versus client disconnects, malformed upstream shapes, usage over rounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy import responses, stash
from proxy.app import create_app
from proxy.state import STATE
from tests.conftest import SSE, policy_from, records
from tests.responses_streams import FakeResponses, fc, msg, response, sse_event, stream_events

TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("ok", "bad", "get_weather")
]
BAD = {"tools": {"bad": {"allow": False}}}
ERROR_MODE = {
    "on_block": "error",
    "tools": {"ok": {"rate_limit": {"max_calls": 1, "window": 60}}, "bad": {"allow": False}},
}
UPSTREAM_ERROR = {
    "type": "error",
    "sequence_number": 0,
    "error": {"type": "server_error", "code": "server_error", "message": "boom", "param": None},
}


def parsed(events: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(e.split(b"data: ", 1)[1]) for e in events]


def upto(events: list[bytes], pred: Any) -> list[bytes]:
    """The events up to and including the first whose JSON matches `pred`."""
    for i, obj in enumerate(parsed(events)):
        if pred(obj):
            return events[: i + 1]
    raise AssertionError("no such event")


def first_delta_of(index: int) -> Any:
    return lambda o: o["type"].endswith(".delta") and o.get("output_index") == index


def done_of(index: int) -> Any:
    return lambda o: o["type"] == "response.output_item.done" and o["output_index"] == index


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def read_until_error(stream: Any) -> tuple[list[Any], openai.APIError]:
    got: list[Any] = []
    with pytest.raises(openai.APIError) as err:
        async for event in stream:
            got.append(event)
    return got, err.value


def mentions(events: list[Any], text: str) -> bool:
    return any(text in e.model_dump_json(warnings=False) for e in events)


@dataclass
class PausingSSE(SSE):
    """Sends `events[:pause]`, waits for `resume` (at most `wait` seconds), then the rest."""

    pause: int = 0
    wait: float = 3.0
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    timed_out: bool = False

    async def send(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, event in enumerate(self.events):
                if i == self.pause:
                    try:
                        await asyncio.wait_for(self.resume.wait(), self.wait)
                    except TimeoutError:
                        self.timed_out = True
                await resp.write(event)
                self.sent += 1
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.aborted = True
            raise
        return resp


# -- 1. upstream errors mid-stream ----------------------------------------------------------


async def test_error_event_records_every_call_once_and_the_held_one_as_blocked(
    make_proxy, upstream
):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    seen = records(proxy)
    body = response(
        fc("ok", {"a": 1}, "c_ok"),
        fc("bad", {}, "c_bad"),
        fc("get_weather", {"city": "Paris, France"}, "c_held"),
    )
    events = upto(stream_events(body, piece=4), first_delta_of(2))
    upstream.push(SSE([*events, sse_event(UPSTREAM_ERROR)], done=False))
    stream = await proxy.client().responses.create(model="m", input="x", tools=TOOLS, stream=True)
    got, err = await read_until_error(stream)
    assert err.message == "boom"  # the upstream's own error event
    assert mentions(got, "c_ok") and not mentions(got, "c_bad") and not mentions(got, "c_held")
    # Recorded before the error was passed on: the client has it, so the records exist.
    by_call = {r["call_id"]: r for r in seen}
    assert len(seen) == 3 and set(by_call) == {"c_ok", "c_bad", "c_held"}
    assert by_call["c_ok"]["decision"] == "allowed"
    assert by_call["c_bad"]["decision"] == "blocked" and by_call["c_bad"]["reason"] == (
        "tool_not_allowed"
    )
    held = by_call["c_held"]
    assert held["decision"] == "blocked" and held["reason"] == "upstream_error"
    assert "boom" in held["message"]
    # The allowed call was recorded as it was sent (audit before delivery); the rest at the end.
    assert by_call["c_ok"]["action"] is None
    assert {r["action"] for r in seen if r["call_id"] != "c_ok"} == {"fail_closed"}


async def test_error_event_in_error_mode_withholds_and_refunds_the_decided_call(
    make_proxy, upstream
):
    proxy = await make_proxy(ERROR_MODE)
    seen = records(proxy)
    api = FakeResponses()
    body = response(fc("ok", {}, "c_ok"), fc("get_weather", {"city": "Rome"}, "c_held"))
    events = upto(stream_events(body, piece=4), first_delta_of(1))
    upstream.push(SSE([*events, sse_event(UPSTREAM_ERROR)], done=False))
    client = proxy.client()
    stream = await client.responses.create(model="m", input="x", tools=TOOLS, stream=True)
    got, err = await read_until_error(stream)
    assert err.message == "boom"
    assert not mentions(got, "c_ok")  # held until settled; the response never settled
    by_call = {r["call_id"]: r for r in seen}
    assert len(seen) == 2
    assert by_call["c_ok"]["decision"] == "blocked"
    assert by_call["c_ok"]["reason"] == "upstream_error"
    assert by_call["c_held"]["decision"] == "blocked"
    upstream.push(api.reply(response(fc("ok", {}, "c_ok2"))))  # the slot was given back
    again = await client.responses.create(model="m", input="x", tools=TOOLS)
    assert [o.call_id for o in again.output] == ["c_ok2"]


@pytest.mark.parametrize("policy", [ERROR_MODE, {}], ids=["error_mode", "plain"])
async def test_response_failed_records_each_call_once(make_proxy, upstream, policy):
    proxy = await make_proxy(policy)
    seen = records(proxy)
    failed = response(msg("partial"), fc("ok", {}, "c_ok"), status="failed")
    failed["error"] = {"code": "server_error", "message": "model crashed"}
    upstream.push(SSE(stream_events(failed), done=False))
    events = [
        e
        async for e in await proxy.client().responses.create(
            model="m", input="x", stream=True, tools=TOOLS
        )
    ]
    last = events[-1]
    assert last.type == "response.failed" and last.response.error.message == "model crashed"
    assert len(seen) == 1 and seen[0]["call_id"] == "c_ok"
    if policy:
        # Held until settled (error mode), and the response failed: never sent, refunded.
        assert not mentions(events, "c_ok")
        assert seen[0]["decision"] == "blocked" and seen[0]["action"] == "fail_closed"
        assert [o.type for o in last.response.output] == ["message"]
        api = FakeResponses()
        upstream.push(api.reply(response(fc("ok", {}, "c_ok2"))))
        again = await proxy.client().responses.create(model="m", input="x", tools=TOOLS)
        assert [o.call_id for o in again.output] == ["c_ok2"]
    else:
        assert mentions(events[:-1], "c_ok")  # streamed as soon as complete
        assert seen[0]["decision"] == "allowed"


# -- 2. error mode: no call is sent before the response is settled --------------------------


async def test_error_mode_stream_sends_no_allowed_call_and_refunds_it(make_proxy, upstream):
    proxy = await make_proxy(ERROR_MODE)
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(api.reply(response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"))))
    client = proxy.client()
    stream = await client.responses.create(model="m", input="x", tools=TOOLS, stream=True)
    got, err = await read_until_error(stream)
    assert err.body["type"] == "tool_call_blocked" and err.body["code"] == "rules"
    assert not mentions(got, "c_ok") and not mentions(got, "c_bad")
    assert {(r["tool"], r["decision"]) for r in seen} == {("ok", "withheld"), ("bad", "blocked")}
    upstream.push(api.reply(response(fc("ok", {}, "c_ok2"))))
    async with client.responses.stream(model="m", input="x", tools=TOOLS) as s:
        final = await s.get_final_response()
    assert [o.call_id for o in final.output] == ["c_ok2"]


async def test_error_mode_stream_releases_allowed_calls_once_settled(make_proxy, upstream):
    proxy = await make_proxy(ERROR_MODE)
    api = FakeResponses()
    upstream.push(api.reply(response(fc("ok", {}, "c_ok"), msg("and some text"))))
    async with proxy.client().responses.stream(model="m", input="x", tools=TOOLS) as s:
        events = [e async for e in s]
        final = await s.get_final_response()
    assert [o.type for o in final.output] == ["function_call", "message"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_text.delta")


async def test_without_error_mode_calls_stream_out_as_soon_as_complete(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    body = response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"))
    events = stream_events(body)
    pause = len(upto(events, done_of(0)))
    sse = PausingSSE(events, done=False, pause=pause)
    upstream.push(sse)
    stream = await proxy.client().responses.create(model="m", input="x", tools=TOOLS, stream=True)
    async for event in stream:
        if (
            event.type == "response.output_item.done"
            and getattr(event.item, "call_id", 0) == "c_ok"
        ):
            sse.resume.set()  # the upstream has not sent anything of the next call yet
    assert not sse.timed_out


# -- 3. timeouts and client disconnects -----------------------------------------------------


async def test_stream_read_timeout_is_upstream_timeout(make_proxy, upstream):
    proxy = await make_proxy({"upstream": {"timeout": 0.3}})
    seen = records(proxy)
    events = stream_events(response(fc("ok", {"a": "long enough"}, "c_ok")), piece=4)
    part = upto(events, first_delta_of(0))
    upstream.push(PausingSSE(events, done=False, pause=len(part), wait=2.0))
    stream = await proxy.client().responses.create(model="m", input="x", tools=TOOLS, stream=True)
    _, err = await read_until_error(stream)
    assert err.body["code"] == "upstream_timeout"
    assert [(r["call_id"], r["decision"], r["reason"]) for r in seen] == [
        ("c_ok", "blocked", "upstream_timeout")
    ]


@contextlib.asynccontextmanager
async def gateway(make_proxy, upstream, clock, config, cancel):
    """callgate's URL and state: the test server (which cancels a handler whose client left),
    or one served like `callgate serve` does (no cancellation: writes fail instead)."""
    if cancel:
        proxy = await make_proxy(config)
        yield proxy.url, proxy.state
        return
    app = create_app(policy_from(config, upstream.url), clock=clock)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1", app[STATE]
    finally:
        await runner.cleanup()


async def leave_after(url: str, marker: bytes) -> None:
    """Start a stream, read until `marker`, then go away."""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            url + "/responses", json={"model": "m", "input": "x", "stream": True, "tools": TOOLS}
        )
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            if marker in buf:
                break
        resp.close()  # the client goes away mid-stream


@pytest.mark.parametrize("cancel", [True, False], ids=["cancelled", "write_fails"])
async def test_client_disconnect_is_not_blamed_on_the_upstream(make_proxy, upstream, clock, cancel):
    body = response(fc("ok", {}, "c_ok"), msg(" ".join(["word"] * 200)))
    sse = SSE(stream_events(body), done=False, delay=0.02)
    upstream.push(sse)
    async with gateway(make_proxy, upstream, clock, {}, cancel) as (url, state):
        seen: list[dict[str, Any]] = []
        state.auditor.listeners.append(seen.append)
        await leave_after(url, b"event: response.output_item.done")  # the call's
        await until(lambda: bool(seen) and sse.aborted)
    assert [(r["call_id"], r["decision"]) for r in seen] == [("c_ok", "allowed")]
    assert seen[0]["action"] is None  # recorded as it was sent, before the client left
    assert sse.sent < len(sse.events)  # the upstream stream was cancelled


@pytest.mark.parametrize("cancel", [True, False], ids=["cancelled", "write_fails"])
async def test_client_disconnect_while_a_call_is_held_blocks_it(
    make_proxy, upstream, clock, cancel
):
    events = stream_events(response(fc("ok", {"a": "long enough"}, "c_ok")), piece=4)
    part = upto(events, first_delta_of(0))
    sse = SSE([*part, *[b": keep-alive\n\n"] * 200], done=False, delay=0.02)
    upstream.push(sse)
    async with gateway(make_proxy, upstream, clock, {}, cancel) as (url, state):
        seen: list[dict[str, Any]] = []
        state.auditor.listeners.append(seen.append)
        await leave_after(url, b"keep-alive")
        await until(lambda: bool(seen) and sse.aborted)
    assert [(r["call_id"], r["decision"], r["reason"], r["action"]) for r in seen] == [
        ("c_ok", "blocked", "client_disconnected", "client_disconnected")
    ]


@dataclass
class StallingJSON(SSE):
    """A JSON answer whose body stops half-way (then the server waits)."""

    async def send(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": "1000"}
        )
        await resp.prepare(request)
        await resp.write(b'{"id": "resp_t", ')
        await asyncio.sleep(2)
        return resp


async def test_get_response_read_timeout_is_504(make_proxy, upstream):
    proxy = await make_proxy({"upstream": {"timeout": 0.3}})
    await proxy.state.store.put_stash(stash.responses_key("resp_t"), b'{"hide": ["id:x"]}', 60)
    upstream.push(StallingJSON([]))
    with pytest.raises(openai.APIStatusError) as err:
        await proxy.client().responses.retrieve("resp_t")
    assert err.value.status_code == 504 and err.value.body["code"] == "upstream_timeout"


# -- 4. malformed upstream shapes -----------------------------------------------------------


def _with_output(output: Any) -> dict[str, Any]:
    body = response()
    body["output"] = output
    return body


@pytest.mark.parametrize(
    "output",
    [
        "x",
        [1],
        [["function_call"]],
        [{"type": ["function_call"], "name": "bad", "call_id": "c1", "arguments": "{}"}],
        [{"type": {"x": 1}}],
        [{"type": "function_call", "name": ["bad"], "call_id": "c1", "arguments": "{}"}],
    ],
)
async def test_malformed_output_is_502(make_proxy, upstream, output):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    upstream.push(_with_output(output))
    with pytest.raises(openai.APIStatusError) as err:
        await proxy.client().responses.create(model="m", input="x", tools=TOOLS)
    assert err.value.status_code == 502
    assert err.value.body["code"] == "upstream_malformed"


async def test_odd_but_usable_shapes_are_gated(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    seen = records(proxy)
    odd_msg = {"type": "message", "id": "m1", "role": "assistant", "content": 5}
    call = {"type": "function_call", "name": "ok", "call_id": "c_ok", "arguments": 123}
    upstream.push(_with_output([odd_msg, call, fc("bad", {}, "c_bad")]))
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            proxy.url + "/responses", json={"model": "m", "input": "x", "tools": TOOLS}
        )
        data = await r.json()
    assert r.status == 200
    assert [o.get("call_id") for o in data["output"]][:2] == [None, "c_ok"]
    assert "[callgate] blocked tool call: bad" in data["output"][-1]["content"][0]["text"]
    assert {(x["call_id"], x["decision"]) for x in seen} == {
        ("c_ok", "allowed"),
        ("c_bad", "blocked"),
    }


def _stream_with(events: list[Any], rid: str | None = None) -> SSE:
    created = {"type": "response.created", "response": {**response(rid=rid), "output": []}}
    return SSE([sse_event(created), *[sse_event(e) for e in events]], done=False)


@pytest.mark.parametrize(
    "bad_events",
    [
        [{"type": "response.output_item.added", "output_index": 0, "item": ["function_call"]}],
        [{"type": "response.output_item.added", "output_index": 0, "item": {"type": ["x"]}}],
        [
            {"type": "response.output_item.added", "output_index": 0, "item": fc("ok")},
            {"type": "response.output_item.done", "output_index": 0, "item": [1]},
        ],
        [
            {"type": "response.output_item.added", "output_index": 0, "item": fc("ok")},
            {"type": "response.output_item.done", "output_index": 0, "item": msg("now a message")},
        ],
        [{"type": "response.completed", "response": [fc("bad")]}],
        [{"type": "response.completed", "response": {**response(), "output": "x"}}],
        [{"type": "response.completed", "response": {**response(), "output": [[1]]}}],
        [{"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "{"}],
        [{"type": "response.output_item.added", "item": fc("ok")}],
    ],
    ids=[
        "item_list",
        "item_type_list",
        "done_item_list",
        "done_item_changes_type",
        "response_list",
        "output_string",
        "output_item_list",
        "delta_for_unknown_item",
        "added_without_index",
    ],
)
async def test_malformed_stream_events_fail_closed(make_proxy, upstream, bad_events):
    proxy = await make_proxy(BAD)
    seen = records(proxy)
    for n, event in enumerate(bad_events):
        event["sequence_number"] = n + 1
    upstream.push(_stream_with(bad_events))
    stream = await proxy.client().responses.create(model="m", input="x", tools=TOOLS, stream=True)
    _, err = await read_until_error(stream)
    assert err.body["code"] == "upstream_malformed"
    assert all(r["decision"] == "blocked" for r in seen)
    # The process keeps serving.
    upstream.push(FakeResponses().reply(response(msg("fine"))))
    ok = await proxy.client().responses.create(model="m", input="x")
    assert ok.output_text == "fine"


async def test_final_output_calls_the_stream_never_announced_are_gated(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    seen = records(proxy)
    full = response(msg("hi"), fc("bad", {}, "c_bad"))
    events = stream_events(response(msg("hi"), rid=full["id"]))
    final = parsed(events)[-1]
    final["response"] = full  # the terminal event lists a call no item event announced
    upstream.push(SSE([*events[:-1], sse_event(final)], done=False))
    async with proxy.client().responses.stream(model="m", input="x", tools=TOOLS) as s:
        result = await s.get_final_response()
    assert [o.type for o in result.output] == ["message", "message"]
    assert "c_bad" not in result.model_dump_json(warnings=False)
    assert [(r["call_id"], r["decision"]) for r in seen] == [("c_bad", "blocked")]


async def test_corrupt_stash_entries_do_not_break_requests(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    store = proxy.state.store
    junk = {
        "outputs": "x",
        "groups": [1, {"items": 5}, {"after": None}],
        "calls": [1],
        "hide": [[1], "id:x"],
        "prefix": 5,
        "extra": "y",
        "target": 7,
        "input_of": [],
        "previous_response_id": 3,
    }
    principal = "p1"
    for key in (
        stash.responses_key("resp_junk"),
        responses.call_key(principal, "c1"),
        stash.responses_key("resp_bytes"),
    ):
        await store.put_stash(key, json.dumps(junk).encode(), 60)
    await store.put_stash(stash.responses_key("resp_bytes"), b"{not json", 60)
    api = FakeResponses()
    api.stored["resp_junk"] = response(msg("old"), rid="resp_junk")
    api.inputs["resp_junk"] = []
    client = proxy.client(default_headers={"x-callgate-principal": principal})
    upstream.push(api.reply(response(msg("a"))))
    r1 = await client.responses.create(model="m", previous_response_id="resp_junk", input="hi")
    assert r1.output_text == "a"
    assert upstream.bodies("/v1/responses")[-1]["previous_response_id"] == "resp_junk"
    full_input = [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "ok", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
    ]
    upstream.push(api.reply(response(msg("b"))))
    r2 = await client.responses.create(model="m", input=full_input)
    assert r2.output_text == "b"
    upstream.push(api.get, api.get)
    got = await client.responses.retrieve("resp_junk")
    assert got.output_text == "old"
    items = await client.responses.input_items.list("resp_junk")
    assert items.data == []
    upstream.push(api.get)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_bytes")  # unreadable entry: forwarded as is


async def test_stashed_calls_are_scoped_by_principal(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    first = response(fc("ok", {}, "c_ok"), fc("bad", {}, "c_bad"), rid="resp_p")
    upstream.push(api.reply(first))
    alice = proxy.client(default_headers={"x-callgate-principal": "alice"})
    r1 = await alice.responses.create(model="m", input="hi", tools=TOOLS, store=False)
    assert [o.call_id for o in r1.output] == ["c_ok"]
    turn = [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c_ok", "name": "ok", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c_ok", "output": "1"},
    ]
    mallory = proxy.client(default_headers={"x-callgate-principal": "mallory"})
    upstream.push(api.reply(response(msg("m"))))
    await mallory.responses.create(model="m", input=turn, tools=TOOLS, store=False)
    sent = upstream.bodies("/v1/responses")[-1]["input"]
    assert "c_bad" not in json.dumps(sent)  # someone else's call id pulls in nothing
    upstream.push(api.reply(response(msg("a"))))
    await alice.responses.create(model="m", input=turn, tools=TOOLS, store=False)
    sent = upstream.bodies("/v1/responses")[-1]["input"]
    assert "c_bad" in json.dumps(sent)


async def test_odd_client_tools_and_input_do_not_500(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"web_search": {"allow": False}}})
    upstream.push(response(msg("fine")))
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            proxy.url + "/responses",
            json={
                "model": "m",
                "input": [{"type": ["function_call"], "call_id": "c"}, {"type": {}}],
                "tools": [{"type": ["function"], "name": "x"}, {"type": {"a": 1}}, 5],
            },
        )
        error = (await r.json())["error"]
    # Unreadable shapes are a 400 naming the field, before anything goes upstream (issue 19).
    assert r.status == 400 and error["param"] == "input[0].type"
    assert upstream.received == []


# -- 5. usage -------------------------------------------------------------------------------

ROUND1 = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 3},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 15,
}
ROUND2 = {
    "input_tokens": 20,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 1},
    "total_tokens": 27,
}
SUMMED = {
    "input_tokens": 30,
    "input_tokens_details": {"cached_tokens": 7},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 3},
    "total_tokens": 42,
}


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_sums_every_round_with_details(make_proxy, upstream, stream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("bad", {}, "c1"), usage=ROUND1)),
        api.reply(response(msg("sorry"), usage=ROUND2)),
    )
    client = proxy.client()
    if stream:
        async with client.responses.stream(model="m", input="x", tools=TOOLS) as s:
            result = await s.get_final_response()
    else:
        result = await client.responses.create(model="m", input="x", tools=TOOLS)
    assert result.output_text == "sorry"
    assert result.usage.model_dump(exclude_none=True) == SUMMED


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_of_the_last_round_is_kept_when_the_first_had_none(
    make_proxy, upstream, stream
):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    first = response(fc("bad", {}, "c1"))
    first["usage"] = None
    upstream.push(api.reply(first), api.reply(response(msg("sorry"), usage=ROUND2)))
    client = proxy.client()
    if stream:
        async with client.responses.stream(model="m", input="x", tools=TOOLS) as s:
            result = await s.get_final_response()
    else:
        result = await client.responses.create(model="m", input="x", tools=TOOLS)
    assert result.usage.model_dump(exclude_none=True) == ROUND2


@pytest.mark.parametrize("stream", [False, True])
async def test_calls_sharing_an_id_are_removed_by_position(make_proxy, upstream, stream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    seen = records(proxy)
    body = response(fc("ok", {}, "dup"), fc("bad", {}, "dup"))
    upstream.push(FakeResponses().reply(body))
    client = proxy.client()
    if stream:
        async with client.responses.stream(model="m", input="x", tools=TOOLS) as s:
            result = await s.get_final_response()
    else:
        result = await client.responses.create(model="m", input="x", tools=TOOLS)
    assert [(o.type, getattr(o, "name", None)) for o in result.output] == [
        ("function_call", "ok"),
        ("message", None),
    ]
    assert {(r["tool"], r["decision"]) for r in seen} == {("ok", "allowed"), ("bad", "blocked")}


async def test_call_cut_off_by_an_incomplete_response_is_not_in_its_output(make_proxy, upstream):
    proxy = await make_proxy({})
    seen = records(proxy)
    cut = fc("ok", {"a": "long enough"}, "c_cut")
    full = response(msg("partial"), cut, status="incomplete")
    full["incomplete_details"] = {"reason": "max_output_tokens"}
    events = stream_events(full, piece=4)
    part = upto(events, first_delta_of(1))
    upstream.push(SSE([*part, events[-1]], done=False))
    async with proxy.client().responses.stream(model="m", input="x", tools=TOOLS) as s:
        got = [e async for e in s]
    final = got[-1]
    assert final.type == "response.incomplete"
    assert [o.type for o in final.response.output] == ["message"]
    assert not mentions(got, "c_cut")
    assert [(r["call_id"], r["decision"], r["reason"]) for r in seen] == [
        ("c_cut", "blocked", "incomplete_tool_call")
    ]


async def test_a_call_announced_only_at_done_is_held_and_gated(make_proxy, upstream):
    proxy = await make_proxy({**BAD, "on_block": "strip"})
    seen = records(proxy)
    bad = fc("bad", {}, "c_bad")
    full = response(bad)
    events = [
        {"type": "response.output_item.done", "output_index": 0, "item": bad},
        {"type": "response.completed", "response": full},
    ]
    for n, event in enumerate(events):
        event["sequence_number"] = n + 1
    upstream.push(_stream_with(events, full["id"]))
    async with proxy.client().responses.stream(model="m", input="x", tools=TOOLS) as s:
        got = [e async for e in s]
    assert not mentions(got, "c_bad")
    assert [(r["call_id"], r["decision"]) for r in seen] == [("c_bad", "blocked")]


async def test_events_after_the_terminal_event_are_dropped(make_proxy, upstream):
    proxy = await make_proxy({})
    seen = records(proxy)
    events = stream_events(response(msg("hi")))
    late = fc("ok", {}, "c_late")
    tail = [
        {"type": "response.output_item.added", "output_index": 1, "item": late},
        {"type": "response.output_item.done", "output_index": 1, "item": late},
    ]
    upstream.push(SSE([*events, *[sse_event({**e, "sequence_number": 99}) for e in tail]]))
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            proxy.url + "/responses", json={"model": "m", "input": "x", "stream": True}
        )
        raw = await r.read()
    assert b"c_late" not in raw and seen == []
