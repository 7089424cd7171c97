"""Built-in tools the client runs (shell, local_shell, apply_patch) gated call by call on
/v1/responses, streaming and not, with the real openai SDK as the client."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import records
from tests.responses_streams import (
    FakeResponses,
    fc,
    local_shell,
    msg,
    patch,
    response,
    rs,
    shell,
    stream_events,
)

SHELL = {"type": "shell", "environment": {"type": "local"}}
TOOLS = [
    SHELL,
    {"type": "apply_patch"},
    {"type": "function", "name": "ok", "parameters": {"type": "object", "properties": {}}},
]
POLICY = {
    "tools": {
        "shell": {
            "rules": [{"name": "no_rm", "deny_if": 'args.commands.exists(c, c.contains("rm -rf"))'}]
        },
        "local_shell": {
            "rules": [{"name": "no_sudo", "deny_if": 'args.command[0] == "sudo"'}],
        },
        "apply_patch": {
            "rules": [{"name": "no_secrets", "deny_if": 'args.path.startsWith("secrets/")'}]
        },
    }
}


def with_mode(mode: str) -> dict[str, Any]:
    return {**POLICY, "on_block": mode}


def types(resp: Any) -> list[str]:
    return [o.type for o in resp.output]


def error_of(text: str) -> dict[str, Any]:
    error = json.loads(text)
    assert error["error"] == "tool_call_blocked"
    return error


def sent(upstream: Any, n: int) -> dict[str, Any]:
    return upstream.bodies("/v1/responses")[n]


# -- non-streaming ------------------------------------------------------------------------


async def test_allowed_shell_and_patch_pass_byte_for_byte(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    api = FakeResponses()
    body = response(shell(["ls -la", "git status"], "c_sh"), patch("src/app.py", call_id="c_p"))
    upstream.push(api.reply(body))
    raw = await proxy.client().responses.with_raw_response.create(
        model="m", input="look around", tools=TOOLS
    )
    assert json.loads(raw.http_response.content) == {**body, "previous_response_id": None}
    result = raw.parse()
    assert types(result) == ["shell_call", "apply_patch_call"]
    assert result.output[0].action.commands == ["ls -la", "git status"]
    assert [(r["tool"], r["policy"], r["decision"], r["call_id"]) for r in seen] == [
        ("shell", "shell", "allowed", "c_sh"),
        ("apply_patch", "apply_patch", "allowed", "c_p"),
    ]
    assert seen[0]["arguments"]["commands"] == ["ls -la", "git status"]
    assert seen[1]["arguments"] == {"type": "update_file", "path": "src/app.py", "diff": "+x\n"}


async def test_shell_rule_blocks_reprompt_with_shell_call_output(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    api = FakeResponses()
    first = response(rs(), shell(["cd /tmp", "rm -rf /"], "c_rm"))
    upstream.push(api.reply(first), api.reply(response(msg("I will not delete that."))))
    result = await proxy.client().responses.create(model="m", input="clean", tools=TOOLS)
    assert result.output_text == "I will not delete that."
    second = sent(upstream, 1)
    assert second["previous_response_id"] == first["id"]
    [out] = second["input"]
    assert out["type"] == "shell_call_output" and out["call_id"] == "c_rm"
    [chunk] = out["output"]
    assert chunk["stdout"] == "" and chunk["outcome"] == {"type": "exit", "exit_code": 1}
    error = error_of(chunk["stderr"])
    assert error["gate"] == "rules" and error["message"] == "Policy violation: no_rm"
    assert [(r["tool"], r["decision"], r["action"]) for r in seen] == [
        ("shell", "blocked", "reprompt")
    ]


async def test_apply_patch_blocked_reprompt_with_failed_output(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    api = FakeResponses()
    upstream.push(
        api.reply(response(patch("secrets/key.pem", call_id="c_p"))),
        api.reply(response(msg("That path is off limits."))),
    )
    result = await proxy.client().responses.create(model="m", input="edit", tools=TOOLS)
    assert result.output_text == "That path is off limits."
    [out] = sent(upstream, 1)["input"]
    assert out["type"] == "apply_patch_call_output" and out["call_id"] == "c_p"
    assert out["status"] == "failed"
    assert error_of(out["output"])["message"] == "Policy violation: no_secrets"


async def test_local_shell_blocked_reprompt(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    api = FakeResponses()
    upstream.push(
        api.reply(response(local_shell(["sudo", "reboot"], "c_l"))),
        api.reply(response(msg("ok"))),
    )
    await proxy.client().responses.create(
        model="m", input="reboot", tools=[{"type": "local_shell"}]
    )
    [out] = sent(upstream, 1)["input"]
    assert out["type"] == "local_shell_call_output" and out["call_id"] == "c_l"
    assert error_of(out["output"])["message"] == "Policy violation: no_sudo"


async def test_strip_then_next_turn_carries_stashed_shell_output(make_proxy, upstream):
    proxy = await make_proxy(with_mode("strip"))
    seen = records(proxy)
    api = FakeResponses()
    first = response(msg("Two steps."), shell(["rm -rf build"], "c_rm"), fc("ok", {}, "c_ok"))
    upstream.push(api.reply(first), api.reply(response(msg("done"))))
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="go", tools=TOOLS)
    assert types(r1) == ["message", "function_call", "message"]
    assert r1.output_text.endswith("[callgate] blocked tool call: shell (Policy violation: no_rm)")
    assert {(r["tool"], r["action"]) for r in seen} == {("shell", "strip+stash"), ("ok", None)}
    r2 = await client.responses.create(
        model="m",
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": "c_ok", "output": "1"}],
        tools=TOOLS,
    )
    assert r2.output_text == "done"  # the fake upstream refuses a turn missing an output
    items = sent(upstream, 1)["input"]
    assert [(i["type"], i["call_id"]) for i in items] == [
        ("shell_call_output", "c_rm"),
        ("function_call_output", "c_ok"),
    ]
    # Reading the first response back shows the client's view.
    upstream.push(api.get)
    got = await client.responses.retrieve(r1.id)
    assert types(got) == ["message", "function_call", "message"]
    # Without callgate's output the upstream would have refused the turn.
    upstream.push(api.reply(response(msg("never"))))
    bare = openai.AsyncOpenAI(base_url=upstream.url, api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        await bare.responses.create(
            model="m",
            previous_response_id=r1.id,
            input=[{"type": "function_call_output", "call_id": "c_ok", "output": "1"}],
        )
    assert err.value.body["message"] == "No tool output found for shell call c_rm."
    await bare.close()


async def test_full_input_turn_reinserts_blocked_patch(make_proxy, upstream):
    proxy = await make_proxy(POLICY)  # reprompt mode, partial block: dropped and stashed
    api = FakeResponses()
    first = response(patch("secrets/a", call_id="c_p"), shell(["ls"], "c_ls"))
    upstream.push(api.reply(first), api.reply(response(msg("done"))))
    client = proxy.client()
    r1 = await client.responses.create(model="m", input="hi", tools=TOOLS, store=False)
    assert types(r1) == ["shell_call"]
    history = [
        {"role": "user", "content": "hi"},
        *[o.model_dump(exclude_none=True) for o in r1.output],
        {
            "type": "shell_call_output",
            "call_id": "c_ls",
            "output": [
                {"stdout": "a\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}
            ],
        },
    ]
    r2 = await client.responses.create(model="m", input=history, tools=TOOLS, store=False)
    assert r2.output_text == "done"
    kinds = [(i.get("type", "message"), i.get("call_id")) for i in sent(upstream, 1)["input"]]
    assert kinds == [
        ("message", None),
        ("apply_patch_call", "c_p"),
        ("apply_patch_call_output", "c_p"),
        ("shell_call", "c_ls"),
        ("shell_call_output", "c_ls"),
    ]


async def test_error_mode_403(make_proxy, upstream):
    proxy = await make_proxy(with_mode("error"))
    api = FakeResponses()
    upstream.push(api.reply(response(shell(["rm -rf ~"], "c_rm"))))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    assert err.value.status_code == 403
    assert err.value.body["type"] == "tool_call_blocked" and err.value.body["code"] == "rules"
    assert "'shell'" in err.value.body["message"]


async def test_rate_limit_and_default_policy(make_proxy, upstream):
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "default": {"allow": False},
            "tools": {"shell": {"rate_limit": {"max_calls": 1, "window": 60}}},
        }
    )
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(
        api.reply(response(shell(["ls"], "c1"), shell(["pwd"], "c2"), patch("a.py", call_id="c3")))
    )
    result = await proxy.client().responses.create(model="m", input="hi", tools=[SHELL])
    assert [o.call_id for o in result.output if o.type == "shell_call"] == ["c1"]
    assert [(r["call_id"], r["policy"], r["reason"]) for r in seen] == [
        ("c1", "shell", None),
        ("c2", "shell", "max_calls"),
        ("c3", "*", "tool_not_allowed"),  # apply_patch: not listed, the default denies it
    ]


async def test_hosted_shell_is_not_gated(make_proxy, upstream):
    """A shell in a hosted container ran at the upstream: the call is not gated (or removed)."""
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    api = FakeResponses()
    call = shell(["rm -rf /tmp/x"], "c_h", type="container_reference", container_id="cntr_1")
    ran = {
        "type": "shell_call_output",
        "id": "sho_1",
        "call_id": "c_h",
        "output": [{"stdout": "", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}],
        "status": "completed",
    }
    upstream.push(api.reply(response(call, ran, msg("Done."))))
    tools = [{"type": "shell", "environment": {"type": "container_auto"}}]
    result = await proxy.client().responses.create(model="m", input="hi", tools=tools)
    assert types(result) == ["shell_call", "shell_call_output", "message"]
    assert seen == []


async def test_denied_builtin_tool_is_removed_and_background_refused(make_proxy, upstream):
    proxy = await make_proxy({"tools": {"apply_patch": {"allow": False}}})
    api = FakeResponses()
    upstream.push(api.reply(response(msg("hi"))))
    client = proxy.client()
    await client.responses.create(model="m", input="hi", tools=TOOLS[:2])
    assert sent(upstream, 0)["tools"] == [SHELL]
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(model="m", input="hi", tools=[SHELL], background=True)
    assert err.value.body["param"] == "background"


# -- streaming ----------------------------------------------------------------------------


def check_wire(events: list[Any]) -> None:
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == list(range(len(added))) and done == added
    indexed = {getattr(e, "output_index", None) for e in events} - {None}
    assert indexed <= set(added)


async def test_allowed_shell_stream_passes_unchanged(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    api = FakeResponses()
    body = response(msg("Listing."), shell(["ls -la"], "c1"), patch("a.py", call_id="c2"))
    upstream.push(api.reply(body))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/responses",
            json={"model": "m", "input": "hi", "stream": True, "tools": TOOLS},
        ) as resp,
    ):
        raw = await resp.read()
    assert raw == b"".join(stream_events({**body, "previous_response_id": None}))


async def test_blocked_shell_stream_events_never_reach_client(make_proxy, upstream):
    proxy = await make_proxy(with_mode("strip"))
    seen = records(proxy)
    api = FakeResponses()
    first = response(
        msg("Cleaning up."),
        shell(["echo start", "rm -rf --no-preserve-root /"], "c_rm"),
        shell(["ls"], "c_ls"),
    )
    upstream.push(api.reply(first), api.reply(response(msg("done"))))
    client = proxy.client()
    async with client.responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_wire(events)
    wire = [e.model_dump_json(warnings=False) for e in events]
    assert not any("c_rm" in w or "rm -rf" in w or "echo start" in w for w in wire)
    commands = [e for e in events if e.type.startswith("response.shell_call_command.")]
    assert {e.output_index for e in commands} == {1}  # c_ls's, renumbered from 2
    assert "".join(e.delta for e in commands if e.type.endswith(".delta")) == "ls"
    assert types(final) == ["message", "shell_call", "message"]
    assert final.output[1].call_id == "c_ls"
    assert final.output_text.endswith("blocked tool call: shell (Policy violation: no_rm)")
    assert {(r["tool"], r["call_id"], r["action"]) for r in seen} == {
        ("shell", "c_rm", "strip+stash"),
        ("shell", "c_ls", None),
    }
    # The next turn carries the stashed error output for the call the client never saw.
    ls_out = {"stdout": "a\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}
    await client.responses.create(
        model="m",
        previous_response_id=final.id,
        input=[{"type": "shell_call_output", "call_id": "c_ls", "output": [ls_out]}],
        tools=TOOLS,
    )
    items = sent(upstream, 1)["input"]
    assert [i["call_id"] for i in items] == ["c_rm", "c_ls"]
    assert items[0]["type"] == "shell_call_output"


async def test_blocked_patch_stream_reprompts_on_the_same_stream(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    api = FakeResponses()
    first = response(rs(), patch("secrets/env", "+TOKEN=1\n" * 4, "c_p"))
    upstream.push(api.reply(first), api.reply(response(msg("Not touching secrets."))))
    client = proxy.client()
    stream = await client.responses.create(model="m", input="hi", tools=TOOLS, stream=True)
    events = [e async for e in stream]
    check_wire(events)
    assert [e.type for e in events if "apply_patch" in e.model_dump_json(warnings=False)] == []
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Not touching secrets."
    [out] = sent(upstream, 1)["input"]
    assert out["type"] == "apply_patch_call_output" and out["status"] == "failed"
    assert out["call_id"] == "c_p"


async def test_error_mode_shell_stream(make_proxy, upstream):
    proxy = await make_proxy(with_mode("error"))
    api = FakeResponses()
    upstream.push(api.reply(response(shell(["ls"], "c_ok"), shell(["rm -rf /"], "c_rm"))))
    stream = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS, stream=True)
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as err:
        async for event in stream:
            seen.append(event)
    assert "no_rm" in str(err.value)
    # Error mode holds allowed calls until the round settles: neither call went out.
    assert not any(getattr(e, "output_index", None) is not None for e in seen)


async def test_stream_helper_accepts_allowed_shell_and_patch(make_proxy, upstream):
    proxy = await make_proxy(with_mode("strip"))
    api = FakeResponses()
    upstream.push(
        api.reply(
            response(
                shell(["rm -rf /"], "c_rm"), shell(["ls"], "c_ls"), patch("a.py", call_id="c_p")
            )
        )
    )
    async with proxy.client().responses.stream(model="m", input="hi", tools=TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_wire(events)
    assert types(final) == ["shell_call", "apply_patch_call", "message"]
    diff = [e for e in events if e.type == "response.apply_patch_call_operation_diff.delta"]
    assert diff and {e.output_index for e in diff} == {1}


async def test_hosted_shell_stream_is_not_held_or_gated(make_proxy, upstream):
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    api = FakeResponses()
    call = shell(["rm -rf /tmp/x"], "c_h", type="container_reference", container_id="cntr_1")
    body = response(call, msg("Done."))
    upstream.push(api.reply(body))
    tools = [{"type": "shell", "environment": {"type": "container_auto"}}]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/responses",
            json={"model": "m", "input": "hi", "stream": True, "tools": tools},
        ) as resp,
    ):
        raw = await resp.read()
    assert raw == b"".join(stream_events({**body, "previous_response_id": None}))
    assert seen == []
