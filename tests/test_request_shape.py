"""Fields callgate reads, in a shape it cannot read: an OpenAI-shaped 400 before anything goes
upstream (issue 19, item 5); what OpenAI accepts stays accepted."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from proxy.request_shape import chat_problem, responses_problem
from tests.conftest import completion
from tests.responses_streams import fc, msg, response

MSGS = [{"role": "user", "content": "hi"}]
POLICY = {
    "server": {"hide_denied_tools": True},
    "tools": {"delete_file": {"allow": False}, "web_search": {"allow": False}},
}
FN = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
RFN = {"type": "function", "name": "get_weather", "parameters": {}}


async def post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"Authorization": "Bearer sk-test"}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": MSGS, **fields}


def resp(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": "hi", **fields}


CHAT_BAD = [
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stream=1), "stream", "invalid_type"),
    (chat(stream=[]), "stream", "invalid_type"),
    (chat(messages={}), "messages", "invalid_type"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages=[1]), "messages[0]", "invalid_type"),
    (chat(messages=[{"role": "user", "content": "x"}, "hi"]), "messages[1]", "invalid_type"),
    (chat(messages=[{"role": 5}]), "messages[0].role", "invalid_type"),
    (chat(messages=[{"role": "assistant", "tool_calls": 5}]), "messages[0].tool_calls", None),
    (chat(messages=[{"role": "assistant", "tool_calls": "abc"}]), "messages[0].tool_calls", None),
    (chat(messages=[{"role": "assistant", "tool_calls": {"id": "x"}}]), None, None),
    (chat(messages=[{"role": "assistant", "tool_calls": [1]}]), "messages[0].tool_calls[0]", None),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"id": 7}]}]), None, None),
    (chat(tools="x"), "tools", "invalid_type"),
    (chat(tools={"0": FN}), "tools", "invalid_type"),
    (chat(tools=[1]), "tools[0]", "invalid_type"),
    (chat(tools=[FN, None]), "tools[1]", "invalid_type"),
    (chat(tools=[{"type": 1, "function": {"name": "a"}}]), "tools[0].type", None),
    (chat(tools=[{"type": "function"}]), "tools[0].function", "missing_required_parameter"),
    (chat(tools=[{"type": "function", "function": "f"}]), "tools[0].function", None),
    (chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name", None),
    (chat(tools=[{"type": "function", "function": {"name": {}}}]), None, "invalid_type"),
    (chat(tools=[{"type": "function", "function": {"name": 3}}]), None, "invalid_type"),
    (chat(tools=[{"function": {"description": "no name"}}]), "tools[0].function.name", None),
    (chat(tools=[{"type": "custom", "custom": {}}]), "tools[0].custom.name", None),
    (chat(tools=[{"type": "custom"}]), "tools[0].custom", None),
    (chat(tools=[FN], tool_choice=5), "tool_choice", "invalid_type"),
    (chat(tools=[FN], tool_choice=True), "tool_choice", "invalid_type"),
    (chat(tools=[FN], tool_choice=["auto"]), "tool_choice", "invalid_type"),
    (chat(tools=[FN], tool_choice={"type": "function"}), "tool_choice.function", None),
    (chat(tools=[FN], tool_choice={"type": "function", "function": {"name": 1}}), None, None),
    (chat(tools=[FN], tool_choice={"type": "allowed_tools"}), "tool_choice.allowed_tools", None),
    (
        chat(tools=[FN], tool_choice={"type": "allowed_tools", "allowed_tools": {"tools": "x"}}),
        "tool_choice.allowed_tools.tools",
        "invalid_type",
    ),
    (
        chat(
            tools=[FN],
            tool_choice={"type": "allowed_tools", "allowed_tools": {"tools": [{"type": 2}]}},
        ),
        "tool_choice.allowed_tools.tools[0].type",
        "invalid_type",
    ),
]

RESP_BAD = [
    (resp(stream="yes"), "stream", "invalid_type"),
    (resp(stream=0), "stream", "invalid_type"),
    (resp(background="true"), "background", "invalid_type"),
    (resp(background=1, tools=[RFN]), "background", "invalid_type"),
    (resp(input=3), "input", "invalid_type"),
    (resp(input={"role": "user", "content": "hi"}), "input", "invalid_type"),
    (resp(input=True), "input", "invalid_type"),
    (resp(input=["hi"]), "input[0]", "invalid_type"),
    (resp(input=[{"type": 1}]), "input[0].type", "invalid_type"),
    (resp(input=[{"type": "function_call_output", "call_id": 5, "output": "x"}]), None, None),
    (resp(input=[{"type": "message", "id": [], "role": "user", "content": "x"}]), None, None),
    (resp(tools="x"), "tools", "invalid_type"),
    (resp(tools=[1]), "tools[0]", "invalid_type"),
    (resp(tools=[{"type": ["web_search"]}]), "tools[0].type", "invalid_type"),
    (resp(tools=[{"type": "function"}]), "tools[0].name", "missing_required_parameter"),
    (resp(tools=[{"type": "function", "name": 1}]), "tools[0].name", "invalid_type"),
    (resp(tools=[{"type": "custom", "name": None}]), "tools[0].name", None),
    (resp(tools=[{"parameters": {}}]), "tools[0].name", "missing_required_parameter"),
    (resp(tools=[{"function": {"parameters": {}}}]), "tools[0].function.name", None),
    (resp(tools=[{"type": "mcp", "server_url": "http://x"}]), "tools[0].server_label", None),
    (resp(tools=[{"type": "mcp", "server_label": 5}]), "tools[0].server_label", "invalid_type"),
    (resp(tools=[RFN], tool_choice=5), "tool_choice", "invalid_type"),
    (resp(tools=[RFN], tool_choice={"type": "function"}), "tool_choice.name", None),
    (resp(tools=[RFN], tool_choice={"type": 3}), "tool_choice.type", "invalid_type"),
    (resp(tools=[RFN], tool_choice={"type": "allowed_tools", "tools": {}}), None, None),
    (resp(tools=[RFN], tool_choice={"type": "allowed_tools", "tools": [1]}), None, None),
    (resp(tool_choice={"type": "mcp", "server_label": 1}), "tool_choice.server_label", None),
]


def _ids(cases: list[Any]) -> list[str]:
    return [json.dumps({k: v for k, v in c[0].items() if k != "model"})[:80] for c in cases]


def assert_shape_error(status: int, data: dict[str, Any], param: str | None, code: str | None):
    assert status == 400, data
    assert set(data) == {"error"}
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] in ("invalid_type", "missing_required_parameter")
    assert isinstance(error["param"], str) and error["param"] in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(("body", "param", "code"), CHAT_BAD, ids=_ids(CHAT_BAD))
async def test_chat_unreadable_fields_are_400(make_proxy, upstream, body, param, code):
    proxy = await make_proxy(POLICY)
    status, data = await post(proxy.url + "/chat/completions", body)
    assert_shape_error(status, data, param, code)
    assert upstream.received == []
    assert chat_problem(body) is not None


@pytest.mark.parametrize(("body", "param", "code"), RESP_BAD, ids=_ids(RESP_BAD))
async def test_responses_unreadable_fields_are_400(make_proxy, upstream, body, param, code):
    proxy = await make_proxy(POLICY)
    status, data = await post(proxy.url + "/responses", body)
    assert_shape_error(status, data, param, code)
    assert upstream.received == []
    assert responses_problem(body) is not None


async def test_sdk_raises_bad_request_with_param(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    client = proxy.client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="gpt-test",
            messages=MSGS,
            tools=[{"type": "function", "function": {"name": 7}}],  # type: ignore[list-item]
        )
    assert err.value.param == "tools[0].function.name"
    assert err.value.code == "invalid_type"
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(model="gpt-test", input=3)  # type: ignore[arg-type]
    assert err.value.param == "input"
    assert upstream.received == []


CHAT_OK = [
    chat(),
    chat(stream=None),
    chat(stream=False),
    chat(tools=None, tool_choice=None),
    chat(tools=[FN], tool_choice="auto"),
    chat(tools=[FN], tool_choice="required"),
    chat(tools=[FN], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    chat(tools=[{"type": "custom", "custom": {"name": "grep", "format": {"type": "text"}}}]),
    chat(
        tools=[FN],
        tool_choice={
            "type": "allowed_tools",
            "allowed_tools": {"mode": "auto", "tools": [FN]},
        },
    ),
    chat(tools=[{"type": "future_tool", "anything": 1}]),  # unknown types: the upstream's call
    chat(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": None},
            {"role": "assistant", "content": "x", "tool_calls": []},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": ""}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        ]
    ),
]

RESP_OK = [
    resp(),
    resp(stream=None, background=None, input=None, previous_response_id="resp_x"),
    resp(background=False, stream=False),
    resp(input=[{"role": "user", "content": "hi"}]),
    resp(
        input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"type": "item_reference", "id": "msg_1"},
        ]
    ),
    resp(tools=[RFN], tool_choice="auto"),
    resp(tools=[RFN], tool_choice={"type": "function", "name": "get_weather"}),
    resp(
        tools=[RFN, {"type": "custom", "name": "grep"}],
        tool_choice={"type": "allowed_tools", "mode": "auto", "tools": [RFN]},
    ),
    resp(tools=[{"type": "mcp", "server_label": "docs", "server_url": "https://x"}]),
    resp(tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}]),
    resp(tools=[{"type": "shell"}, {"type": "apply_patch"}], tool_choice={"type": "shell"}),
    resp(tool_choice={"type": "mcp", "server_label": "docs"}),
]


@pytest.mark.parametrize("body", CHAT_OK, ids=_ids([(b,) for b in CHAT_OK]))
async def test_chat_shapes_openai_accepts_go_through(make_proxy, upstream, body):
    proxy = await make_proxy(POLICY)
    upstream.push(completion(content="ok"))
    status, data = await post(proxy.url + "/chat/completions", body)
    assert status == 200, data
    assert len(upstream.received) == 1
    assert chat_problem(body) is None


@pytest.mark.parametrize("body", RESP_OK, ids=_ids([(b,) for b in RESP_OK]))
async def test_responses_shapes_openai_accepts_go_through(make_proxy, upstream, body):
    proxy = await make_proxy(POLICY)
    upstream.push(response(msg("ok")))
    status, data = await post(proxy.url + "/responses", body)
    assert status == 200, data
    assert len(upstream.received) == 1
    assert responses_problem(body) is None


async def test_denied_server_tool_is_still_removed_and_gates_still_run(make_proxy, upstream):
    # The checks sit in front of the gates, not instead of them.
    proxy = await make_proxy({**POLICY, "on_block": "error"})
    upstream.push(response(fc("delete_file", {"path": "/"})))
    status, data = await post(
        proxy.url + "/responses",
        resp(tools=[RFN, {"type": "web_search"}, {"type": "function", "name": "delete_file"}]),
    )
    assert status == 403 and data["error"]["type"] == "tool_call_blocked"
    sent = upstream.received[0].body["tools"]
    assert [t.get("name", t["type"]) for t in sent] == ["get_weather"]


# -- the fast check against the reference -------------------------------------------------------

_VALUES: list[Any] = [None, True, False, 0, 1.5, "", "x", "assistant", "user", [], {}, [{}]]


def _random_body(rng: Any) -> dict[str, Any]:
    """A Chat body mostly in the common shape, with one field or item now and then off it."""

    def maybe(value: Any) -> Any:
        return rng.choice(_VALUES) if rng.random() < 0.08 else value

    def message() -> Any:
        m: dict[str, Any] = {"role": maybe(rng.choice(["user", "system", "tool", "assistant"]))}
        if m["role"] == "assistant" and rng.random() < 0.5:
            m["tool_calls"] = maybe([{"id": maybe("call_1"), "type": "function"}])
        if rng.random() < 0.1:
            del m["role"]
        m["content"] = "hi"
        return maybe(m)

    def tool() -> Any:
        t: dict[str, Any] = {
            "type": maybe(rng.choice(["function", "function", "custom", "web_search"])),
            "function": maybe({"name": maybe("get_weather"), "parameters": {}}),
        }
        if t["type"] == "custom":
            t["custom"] = maybe({"name": maybe("grep")})
        return maybe(t)

    body: dict[str, Any] = {"model": "m"}
    if rng.random() < 0.95:
        body["messages"] = maybe([message() for _ in range(rng.randrange(4))])
    if rng.random() < 0.7:
        body["tools"] = maybe([tool() for _ in range(rng.randrange(4))])
    if rng.random() < 0.5:
        body["stream"] = maybe(rng.choice([True, False, None]))
    if rng.random() < 0.4:
        body["tool_choice"] = maybe(
            rng.choice(["auto", "required", {"type": "function", "function": {"name": "f"}}])
        )
    return body


def test_chat_fast_check_agrees_with_the_reference() -> None:
    """Whatever the fast check passes, the field-by-field reference passes too; the answer
    chat_problem gives is the reference's on every body."""
    import random

    from proxy.request_shape import _chat_plainly_fine, chat_problem_reference

    rng = random.Random(12)
    fast = 0
    problems = 0
    for _ in range(20_000):
        body = _random_body(rng)
        reference = chat_problem_reference(body)
        assert chat_problem(body) == reference, body
        if _chat_plainly_fine(body):
            fast += 1
            assert reference is None, body
        problems += reference is not None
    # Both kinds are well represented, so the agreement means something.
    assert fast > 3_000 and problems > 3_000, (fast, problems)
    from bench.common import chat_request

    assert _chat_plainly_fine(json.loads(chat_request(stream=True)))
