"""Server-side MCP tools: callgate forces approval on gated servers and answers by policy."""

from __future__ import annotations

import json

import pytest

from tests.conftest import records
from tests.responses_streams import (
    FakeResponses,
    mcp_approval,
    mcp_call,
    mcp_list,
    msg,
    response,
)

POLICY = {
    "tools": {
        "mcp:wiki": {
            "rules": [{"name": "no_secrets", "deny_if": 'args.query.contains("secret")'}],
            "rate_limit": {"max_calls": 5, "window": 60},
        }
    }
}
WIKI = {
    "type": "mcp",
    "server_label": "wiki",
    "server_url": "https://wiki.example/mcp",
    "require_approval": "never",
}
OPEN = {"type": "mcp", "server_label": "open", "server_url": "https://open.example/mcp"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("query,approve", [("weather", True), ("the secret plans", False)])
async def test_gated_mcp_server_answered_by_policy(make_proxy, upstream, stream, query, approve):
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    api = FakeResponses()
    first = response(mcp_list("wiki", "ask"), mcp_approval("wiki", "ask", {"query": query}, "mr1"))
    final_items = [msg("I was not allowed to ask.")]
    if approve:
        final_items = [mcp_call("wiki", "ask", {"query": query}, "sunny"), msg("It is sunny.")]
    upstream.push(api.reply(first), api.reply(response(*final_items)))
    client = proxy.client()
    if stream:
        async with client.responses.stream(model="m", input="q", tools=[WIKI, OPEN]) as s:
            events = [e async for e in s]
            result = await s.get_final_response()
        assert [e.sequence_number for e in events] == list(range(len(events)))
    else:
        result = await client.responses.create(model="m", input="q", tools=[WIKI, OPEN])
    kinds = [o.type for o in result.output]
    assert "mcp_approval_request" not in kinds
    assert result.output_text == ("It is sunny." if approve else "I was not allowed to ask.")
    sent = upstream.bodies("/v1/responses")
    assert sent[0]["tools"][0]["require_approval"] == "always"  # forced on the gated server
    assert "require_approval" not in sent[0]["tools"][1]  # other servers: the client's choice
    [answer] = sent[1]["input"]
    assert sent[1]["previous_response_id"] == first["id"]
    assert answer["type"] == "mcp_approval_response" and answer["approval_request_id"] == "mr1"
    assert answer["approve"] is approve
    if not approve:
        assert json.loads(answer["reason"])["message"] == "Policy violation: no_secrets"
    assert [(r["tool"], r["decision"], r["action"]) for r in seen] == [
        ("mcp:wiki", "allowed" if approve else "blocked", "approve" if approve else "deny")
    ]


async def test_denied_mcp_server_removed_and_error_mode(make_proxy, upstream):
    import openai

    proxy = await make_proxy(
        {
            "tools": {
                "mcp:wiki/delete_page": {"allow": False, "on_block": "error"},
                "mcp:evil": {"allow": False},
            }
        }
    )
    api = FakeResponses()
    upstream.push(api.reply(response(mcp_approval("wiki", "delete_page", {"page": "x"}))))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await proxy.client().responses.create(
            model="m",
            input="q",
            tools=[WIKI, {**OPEN, "server_label": "evil"}],
        )
    assert err.value.body["code"] == "rules"
    sent = upstream.bodies("/v1/responses")[0]
    assert [t["server_label"] for t in sent["tools"]] == ["wiki"]
    assert sent["tools"][0]["require_approval"] == "always"
