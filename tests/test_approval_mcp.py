"""Responses API: an `mcp_approval_request` for a server whose policy has `approval` goes to a
person (not answered by the rules alone): denied with the approval id until a person approves,
then the model's identical request is approved once. Non-streaming and streaming, against the
FakeResponses upstream, with the openai SDK as the client and the admin API over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.conftest import records
from tests.responses_streams import FakeResponses, mcp_approval, mcp_call, mcp_list, msg, response
from tests.test_approval import Admin

TOKEN = "s3cret-admin-token"
WIKI = {
    "type": "mcp",
    "server_label": "wiki",
    "server_url": "https://wiki.example/mcp",
    "require_approval": "never",  # the client's choice; callgate forces "always" here
}


def policy(**approval: Any) -> dict[str, Any]:
    return {
        "server": {"admin_token": TOKEN},
        "tools": {"mcp:wiki": {"approval": {"ttl": 600, **approval}}},
    }


async def ask(proxy: Any, stream: bool) -> Any:
    client = proxy.client()
    if stream:
        async with client.responses.stream(model="m", input="q", tools=[WIKI]) as s:
            events = [e async for e in s]
            result = await s.get_final_response()
        assert [e.sequence_number for e in events] == list(range(len(events)))
        return result
    return await client.responses.create(model="m", input="q", tools=[WIKI])


def answer_sent(upstream: Any) -> dict[str, Any]:
    """The mcp_approval_response callgate sent in the latest upstream request."""
    [answer] = upstream.bodies("/v1/responses")[-1]["input"]
    assert answer["type"] == "mcp_approval_response"
    return dict(answer)


@pytest.mark.parametrize("stream", [False, True])
async def test_mcp_request_escalated_to_a_person(
    make_proxy: Any, upstream: Any, stream: bool
) -> None:
    proxy = await make_proxy(policy())
    seen = records(proxy)
    admin = Admin(proxy.root, TOKEN)
    api = FakeResponses()
    args = {"page": "payroll", "text": "raise for everyone"}

    # 1. The model asks to run wiki/edit: a person is asked, the upstream is told no (for now).
    upstream.push(
        api.reply(response(mcp_list("wiki", "edit", "drop"), mcp_approval("wiki", "edit", args))),
        api.reply(response(msg("I asked a person to approve the edit."))),
    )
    result = await ask(proxy, stream)
    assert result.output_text == "I asked a person to approve the edit."
    assert "mcp_approval_request" not in [o.type for o in result.output]
    assert upstream.bodies("/v1/responses")[0]["tools"][0]["require_approval"] == "always"
    answer = answer_sent(upstream)
    told = json.loads(answer["reason"])
    assert answer["approve"] is False
    assert told["gate"] == "approval" and told["reason"] == "approval_required"
    [pending] = await admin.pending()
    assert pending["id"] == told["approval_id"]
    # The approver sees the server's tool, not only the policy entry that covers the server.
    assert pending["tool"] == "mcp:wiki/edit" and pending["policy"] == "mcp:wiki"
    assert pending["arguments"] == args
    assert seen[-1]["gate"] == "approval" and seen[-1]["action"] == "deny"

    assert (await admin.approve(pending["id"], "ok"))[0] == 200

    # 2. The grant is bound to the server's tool: the same arguments for wiki/drop do not pass.
    upstream.push(
        api.reply(response(mcp_approval("wiki", "drop", args))),
        api.reply(response(msg("Dropping needs approval too."))),
    )
    await ask(proxy, stream)
    assert answer_sent(upstream)["approve"] is False
    assert [a["tool"] for a in await admin.pending()] == ["mcp:wiki/drop"]

    # 3. The model's identical request (a new item id, key order changed) is approved, once.
    same = {"text": "raise for everyone", "page": "payroll"}
    upstream.push(
        api.reply(response(mcp_approval("wiki", "edit", same))),
        api.reply(response(mcp_call("wiki", "edit", same, "saved"), msg("Edited."))),
    )
    result = await ask(proxy, stream)
    assert result.output_text == "Edited."
    assert answer_sent(upstream) == {
        "type": "mcp_approval_response",
        "approval_request_id": answer_sent(upstream)["approval_request_id"],
        "approve": True,
    }
    assert seen[-1]["decision"] == "allowed"
    assert seen[-1]["approval"] == {"id": pending["id"], "state": "used"}

    upstream.push(
        api.reply(response(mcp_approval("wiki", "edit", same))),
        api.reply(response(msg("It needs approval again."))),
    )
    await ask(proxy, stream)
    assert answer_sent(upstream)["approve"] is False  # single use


@pytest.mark.parametrize("stream", [False, True])
async def test_mcp_request_held_for_a_fast_approver(
    make_proxy: Any, upstream: Any, stream: bool
) -> None:
    proxy = await make_proxy(policy(wait=5))
    admin = Admin(proxy.root, TOKEN)
    api = FakeResponses()
    args = {"page": "home"}
    upstream.push(
        api.reply(response(mcp_approval("wiki", "edit", args))),
        api.reply(response(mcp_call("wiki", "edit", args, "saved"), msg("Edited."))),
    )

    async def approver() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = await admin.pending()
            if found:
                assert (await admin.approve(found[0]["id"]))[0] == 200
                return
            await asyncio.sleep(0.02)
        raise AssertionError("no pending approval appeared")

    approving = asyncio.create_task(approver())
    result = await ask(proxy, stream)
    await approving
    assert result.output_text == "Edited."  # held, approved, and answered yes in one request
    assert answer_sent(upstream)["approve"] is True
