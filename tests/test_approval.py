"""Human approval (proxy.approvals, proxy.gates.approval, proxy.routes.admin), memory store.

Real parts throughout: the callgate app on loopback, a scripted upstream, the openai SDK as
the client, the admin API over HTTP, and a FakeClock (time moves, nothing sleeps) for expiry.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from proxy.approvals import canonical_arguments, grant_digest
from proxy.gates.decision import Decision
from proxy.policy import load_policy_text
from proxy.toolcalls import ToolCall
from tests.conftest import SSE, completion, records
from tests.streams import chat_stream

TOKEN = "s3cret-admin-token"


def config(**approval: Any) -> dict[str, Any]:
    return {
        "on_block": "strip",
        "server": {"admin_token": "${CG_TEST_ADMIN_TOKEN}"},
        "tools": {
            "transfer": {
                "approval": {"when": "args.amount > 100", "ttl": 600, **approval},
                "rate_limit": {"max_calls": 100, "window": 60},
            },
            "lookup": {},
        },
    }


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # The policy names ${CG_TEST_ADMIN_TOKEN}: the token comes from the environment.
    monkeypatch.setenv("CG_TEST_ADMIN_TOKEN", TOKEN)


class Admin:
    def __init__(self, root: str, token: str = TOKEN) -> None:
        self.root = root.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.request(
                method,
                self.root + path,
                json=body,
                headers=self.headers if headers is None else headers,
            ) as resp:
                return resp.status, await resp.json(content_type=None)

    async def pending(self) -> list[dict[str, Any]]:
        status, body = await self.request("GET", "/admin/approvals?state=pending")
        assert status == 200, body
        return list(body["data"])

    async def approve(self, approval_id: str, comment: str | None = None) -> tuple[int, Any]:
        return await self.request(
            "POST", f"/admin/approvals/{approval_id}/approve", {"comment": comment}
        )

    async def deny(self, approval_id: str, comment: str | None = None) -> tuple[int, Any]:
        return await self.request(
            "POST", f"/admin/approvals/{approval_id}/deny", {"comment": comment}
        )


async def call(
    proxy: Any, upstream: Any, args: Any, principal: str = "alice", then: str | None = None
) -> Any:
    """One chat round in which the model calls `transfer(args)` (and, reprompted, answers
    `then`): the message the client gets."""
    upstream.push(completion(("transfer", args)))
    if then is not None:
        upstream.push(completion(content=then))
    resp = await proxy.client().chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "pay"}],
        extra_headers={"X-Callgate-Principal": principal},
    )
    return resp.choices[0].message


def passed(message: Any) -> bool:
    return bool(message.tool_calls) and message.tool_calls[0].function.name == "transfer"


async def test_blocked_then_approved_passes_once(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(config())
    seen = records(proxy)
    events: list[dict[str, Any]] = []
    proxy.state.auditor.event_listeners.append(events.append)
    admin = Admin(proxy.root)
    args = {"to": "acct-9", "amount": 500}

    message = await call(proxy, upstream, args)
    assert not passed(message)
    assert "Approval required" in message.content and "a person has been asked" in message.content
    [pending] = await admin.pending()
    assert pending["tool"] == "transfer" and pending["arguments"] == args
    assert pending["principal"] == "alice" and pending["state"] == "pending"
    assert pending["id"] in message.content and pending["created_at"]
    assert seen[-1]["gate"] == "approval" and seen[-1]["reason"] == "approval_required"
    assert seen[-1]["approval"] == {"id": pending["id"], "state": "pending"}

    # The identical call again, still pending: the same approval, not a second one.
    await call(proxy, upstream, {"amount": 500, "to": "acct-9"})  # key order does not matter
    assert [a["id"] for a in await admin.pending()] == [pending["id"]]

    status, answered = await admin.approve(pending["id"], "ok, verified by phone")
    assert status == 200 and answered["state"] == "approved"
    assert (
        answered["decided_by"] == "admin-token" and answered["comment"] == "ok, verified by phone"
    )
    assert events[-1]["event"] == "approval.approved" and events[-1]["by"] == "admin-token"
    assert await admin.pending() == []

    message = await call(proxy, upstream, args)
    assert passed(message)
    assert seen[-1]["decision"] == "allowed"
    assert seen[-1]["approval"] == {"id": pending["id"], "state": "used"}

    # Single use: the next identical call needs a new approval.
    message = await call(proxy, upstream, args)
    assert not passed(message)
    [again] = await admin.pending()
    assert again["id"] != pending["id"]

    # A call `when` does not select needs none.
    assert passed(await call(proxy, upstream, {"to": "acct-9", "amount": 5}))


async def test_grant_is_bound_to_the_call(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(config())
    admin = Admin(proxy.root)
    args = {"to": "acct-9", "amount": 500}
    await call(proxy, upstream, args)
    [pending] = await admin.pending()
    assert (await admin.approve(pending["id"]))[0] == 200

    # Other arguments, another principal: not this grant (each opens a request of its own).
    assert not passed(await call(proxy, upstream, {"to": "acct-9", "amount": 501}))
    assert not passed(await call(proxy, upstream, {"to": "acct-X", "amount": 500}))
    assert not passed(await call(proxy, upstream, args, principal="mallory"))
    assert len(await admin.pending()) == 3
    # The grant itself is intact: the bound call still passes.
    assert passed(await call(proxy, upstream, args))


def test_digest_breaks_on_every_bound_field() -> None:
    policy = load_policy_text("tools:\n  transfer:\n    approval: {ttl: 60}\n", "<t>")
    identity = policy.tools["transfer"].approval.identity  # type: ignore[union-attr]

    def digest(tool: str, arguments: str, principal: str, ident: str = identity) -> str:
        decision = Decision(ToolCall("c1", tool, arguments), tool, "strip")
        decision.args = json.loads(arguments)
        return grant_digest(tool, canonical_arguments(decision), principal, ident)

    base = digest("transfer", '{"a": 1, "b": [1, 2]}', "alice")
    # Spacing and key order are not part of the call.
    assert digest("transfer", '{"b":[1,2],"a":1}', "alice") == base
    assert digest("transfer2", '{"a": 1, "b": [1, 2]}', "alice") != base
    assert digest("transfer", '{"a": 1, "b": [2, 1]}', "alice") != base
    assert digest("transfer", '{"a": 1.5, "b": [1, 2]}', "alice") != base
    assert digest("transfer", '{"a": 1, "b": [1, 2]}', "alice2") != base
    assert digest("transfer", '{"a": 1, "b": [1, 2]}', "alice", identity[::-1]) != base
    # A changed policy entry is another identity.
    changed = (
        load_policy_text("tools:\n  transfer:\n    approval: {ttl: 61}\n", "<t>")
        .tools["transfer"]
        .approval
    )
    assert changed is not None and changed.identity != identity


async def test_changed_policy_voids_the_grant(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(config())
    admin = Admin(proxy.root)
    args = {"to": "acct-9", "amount": 500}
    await call(proxy, upstream, args)
    [pending] = await admin.pending()
    assert (await admin.approve(pending["id"]))[0] == 200
    # A reload that changes the tool's policy (here its rate limit): the grant no longer fits.
    changed = config()
    changed["tools"]["transfer"]["rate_limit"]["max_calls"] = 99
    changed["upstream"] = {"base_url": upstream.url}
    proxy.state.policy = load_policy_text(json.dumps(changed), "<reloaded>")
    assert not passed(await call(proxy, upstream, args))
    [fresh] = await admin.pending()
    assert fresh["id"] != pending["id"]


async def test_expiry_of_requests_and_grants(make_proxy: Any, upstream: Any, clock: Any) -> None:
    proxy = await make_proxy(config(ttl=60))
    events: list[dict[str, Any]] = []
    proxy.state.auditor.event_listeners.append(events.append)
    admin = Admin(proxy.root)
    args = {"to": "acct-9", "amount": 500}

    # A request nobody answers within its ttl expires: approving it is refused.
    await call(proxy, upstream, args)
    [first] = await admin.pending()
    clock.advance(60)
    status, body = await admin.approve(first["id"])
    assert status == 409 and "expired" in body["error"]["message"]
    assert events[-1]["event"] == "approval.expired" and events[-1]["approval"] == first["id"]

    # A grant not used within its ttl expires too.
    await call(proxy, upstream, args)
    [second] = await admin.pending()
    assert second["id"] != first["id"]
    clock.advance(30)
    assert (await admin.approve(second["id"]))[0] == 200
    clock.advance(59.9)
    clock.advance(0.2)  # 60.1 s after the approval
    assert not passed(await call(proxy, upstream, args))
    assert any(e["event"] == "approval.expired" and e["approval"] == second["id"] for e in events)
    status, body = await admin.request("GET", "/admin/approvals?state=expired")
    assert {a["id"] for a in body["data"]} == {first["id"], second["id"]}

    # Used just within the ttl: passes.
    [third] = await admin.pending()
    assert (await admin.approve(third["id"]))[0] == 200
    clock.advance(59.9)
    assert passed(await call(proxy, upstream, args))


async def test_denial_is_told_to_the_model(make_proxy: Any, upstream: Any) -> None:
    cfg = config()
    cfg["on_block"] = "reprompt"
    proxy = await make_proxy(cfg)
    admin = Admin(proxy.root)
    args = {"to": "acct-9", "amount": 500}
    message = await call(proxy, upstream, args, then="I asked for approval.")
    assert message.content == "I asked for approval."
    told = json.loads(upstream.bodies()[1]["messages"][-1]["content"])
    assert told["gate"] == "approval" and told["reason"] == "approval_required"
    [pending] = await admin.pending()
    assert told["approval_id"] == pending["id"]

    status, _ = await admin.deny(pending["id"], "not this account")
    assert status == 200
    # Answered once: a second answer is refused.
    status, body = await admin.approve(pending["id"])
    assert status == 409 and "denied" in body["error"]["message"]

    message = await call(proxy, upstream, args, then="It was denied.")
    assert message.content == "It was denied."
    told = json.loads(upstream.bodies()[-1]["messages"][-1]["content"])
    assert told["reason"] == "approval_denied" and "not this account" in told["message"]
    assert await admin.pending() == []  # the denial stands: nobody is asked again


async def test_wait_holds_the_call_for_a_fast_approver(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(config(wait=5))
    admin = Admin(proxy.root)
    args = {"to": "acct-9", "amount": 500}

    async def approver() -> float:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = await admin.pending()
            if found:
                assert (await admin.approve(found[0]["id"]))[0] == 200
                return time.monotonic()
            await asyncio.sleep(0.02)
        raise AssertionError("no pending approval appeared")

    started = time.monotonic()
    approving = asyncio.create_task(approver())
    message = await call(proxy, upstream, args)
    approved_at = await approving
    assert passed(message)  # held, approved meanwhile, and let through in the same request
    # Woken by the approval itself (same process), not by the end of the wait.
    assert approved_at - started < 4.0 and time.monotonic() - approved_at < 1.0


async def test_wait_ends_blocked_without_an_answer(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(config(wait=0.5))
    started = time.monotonic()
    message = await call(proxy, upstream, {"to": "acct-9", "amount": 500})
    assert not passed(message) and "Approval required" in message.content
    assert 0.4 <= time.monotonic() - started < 3.0


async def test_streaming_call_held_and_approved(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(config(wait=5))
    admin = Admin(proxy.root)
    upstream.push(SSE(chat_stream(("transfer", {"to": "acct-9", "amount": 500}))))
    names, _ = await stream_while_approving(proxy, admin)
    assert names == ["transfer"]


async def stream_while_approving(proxy: Any, admin: Admin) -> tuple[list[str], list[str]]:
    """A streamed request while an approver approves the first pending request it sees: the
    names of the calls the client got, and the tools that were pending then."""

    async def approver() -> list[str]:
        for _ in range(250):
            found = await admin.pending()
            if found:
                assert (await admin.approve(found[0]["id"]))[0] == 200
                return [f["tool"] for f in found]
            await asyncio.sleep(0.02)
        return []

    approving = asyncio.create_task(approver())
    stream = await proxy.client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "pay"}], stream=True
    )
    names = []
    async for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
    return names, await approving


async def test_streamed_calls_of_one_read_wait_together_for_an_approval(
    make_proxy: Any, upstream: Any
) -> None:
    """Two calls complete in one read: decided together, the one that needs approval held for
    the approver; both then reach the client, in the order the model sent them."""
    proxy = await make_proxy(config(wait=5))
    admin = Admin(proxy.root)
    events = chat_stream(("lookup", {"q": "acct-9"}), ("transfer", {"to": "acct-9", "amount": 500}))
    whole = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    upstream.push(SSE([whole]))  # one write: callgate reads both calls at once
    names, pending = await stream_while_approving(proxy, admin)
    assert pending == ["transfer"]
    assert names == ["lookup", "transfer"]


async def test_admin_auth(make_proxy: Any, upstream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await make_proxy(config())
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        admin = Admin(proxy.root)
        status, body = await admin.request("GET", "/admin/approvals", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_admin_token"
        status, _ = await admin.request("POST", "/admin/approvals/apr_x/approve", headers=headers)
        assert status == 401
    status, body = await Admin(proxy.root).request("GET", "/admin/approvals")
    assert status == 200 and body["data"] == []
    status, _ = await Admin(proxy.root).approve("apr_unknown")
    assert status == 404
    status, _ = await Admin(proxy.root).request("GET", "/admin/approvals?state=bogus")
    assert status == 400
    # The page is static (it asks for the token, then calls the API with it).
    async with aiohttp.ClientSession() as session, session.get(proxy.root + "/admin") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "/admin/approvals?state=pending" in await resp.text()

    # Without a token (an unset ${VAR} expands to ""), /admin is not there at all.
    monkeypatch.delenv("CG_TEST_ADMIN_TOKEN")
    bare = await make_proxy(config())
    for path in ("/admin", "/admin/approvals"):
        status, _ = await Admin(bare.root).request("GET", path)
        assert status == 404


def test_admin_token_compare_is_constant_time() -> None:
    """The comparison is hmac.compare_digest over digests of both tokens (so not even the
    token's length shows in the timing): checked in the code, as a timing test on a shared
    machine could not tell."""
    import inspect

    from proxy.routes import admin

    source = inspect.getsource(admin.token_matches)
    assert "hmac.compare_digest(" in source and "_digest(token)" in source
    assert "token_matches(presented, token)" in inspect.getsource(admin.approver)


async def test_agent_loop_with_the_openai_sdk(make_proxy: Any, upstream: Any) -> None:
    """An agent loop: the model calls transfer, is told approval_required (reprompt), says
    so; a person approves over the API; the model's identical retry passes and completes."""
    cfg = config()
    cfg["on_block"] = "reprompt"
    proxy = await make_proxy(cfg)
    admin = Admin(proxy.root)
    client = proxy.client()
    args = {"to": "acct-9", "amount": 500}
    tools = [
        {
            "type": "function",
            "function": {
                "name": "transfer",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]

    def model(received: Any) -> dict[str, Any]:
        # The scripted model: asks for the transfer until it is told the result.
        messages = received.body["messages"]
        last = messages[-1]
        if last["role"] == "tool":
            result = json.loads(last["content"])
            if result.get("reason") == "approval_required":
                return completion(content=f"Waiting for approval {result['approval_id']}.")
            return completion(content=f"Done: {result['status']}")
        return completion(("transfer", args), ids=[f"call_{len(messages)}"])

    upstream.push(model, model)
    messages: list[Any] = [{"role": "user", "content": "Pay acct-9 500"}]
    first = await client.chat.completions.create(model="gpt-test", messages=messages, tools=tools)
    assert first.choices[0].message.content.startswith("Waiting for approval apr_")
    messages.append({"role": "assistant", "content": first.choices[0].message.content})

    [pending] = await admin.pending()
    assert pending["id"] in first.choices[0].message.content
    assert (await admin.approve(pending["id"], "fine"))[0] == 200

    messages.append({"role": "user", "content": "It is approved, go ahead."})
    upstream.push(model, model)
    retry = await client.chat.completions.create(model="gpt-test", messages=messages, tools=tools)
    [tool_call] = retry.choices[0].message.tool_calls or []
    assert json.loads(tool_call.function.arguments) == args
    messages.append(retry.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": '{"status": "sent"}'})
    final = await client.chat.completions.create(model="gpt-test", messages=messages, tools=tools)
    assert final.choices[0].message.content == "Done: sent"
    status, body = await admin.request("GET", "/admin/approvals?state=used")
    assert status == 200 and [a["id"] for a in body["data"]] == [pending["id"]]


async def test_decisions_feed(make_proxy: Any, upstream: Any) -> None:
    """GET /admin/decisions: what was decided (never the arguments), newest last, from `since`
    on, approval events included, counters by tool; the ring is bounded and says what it lost."""
    from proxy.routes.admin import FEED, Feed

    proxy = await make_proxy(config())
    admin = Admin(proxy.root)
    status, body = await admin.request("GET", "/admin/decisions")
    assert status == 200 and body["data"] == [] and body["last"] == 0
    assert (await admin.request("GET", "/admin/decisions?since=x"))[0] == 400
    assert (await admin.request("GET", "/admin/decisions", headers={}))[0] == 401

    args = {"to": "acct-9", "amount": 500, "secret_note": "do-not-show"}
    await call(proxy, upstream, args)
    [pending] = await admin.pending()
    await admin.approve(pending["id"], "ok")
    await call(proxy, upstream, args)
    await call(proxy, upstream, {"to": "acct-9", "amount": 5})
    status, body = await admin.request("GET", "/admin/decisions?since=0")
    feed = body["data"]
    assert [(e["kind"], e.get("decision"), e.get("gate")) for e in feed] == [
        ("decision", "blocked", "approval"),
        ("approval.approved", None, None),
        ("decision", "allowed", None),
        ("decision", "allowed", None),
    ]
    assert [e["seq"] for e in feed] == [1, 2, 3, 4] and body["last"] == 4
    assert feed[1]["by"] == "admin-token" and feed[1]["approval"] == pending["id"]
    assert feed[2]["approval"] == {"id": pending["id"], "state": "used"}
    assert "do-not-show" not in json.dumps(body)
    assert body["counters"] == {"transfer": {"allowed": 2, "blocked": 1, "gates": {"approval": 1}}}
    status, body = await admin.request("GET", "/admin/decisions?since=3")
    assert [e["seq"] for e in body["data"]] == [4] and body["missed"] == 0

    # Bounded: a ring of 3 keeps the last 3; a reader behind it is told how many it missed.
    small = Feed(size=3)
    for record in [feed[0]] * 5:
        small.on_decision({**record, "arguments": None, "action": None, "route": "chat"})
    assert [e["seq"] for e in small.since(0)["data"]] == [3, 4, 5]
    assert small.since(0)["missed"] == 2 and small.since(4)["missed"] == 0
    assert isinstance(proxy.state.extra[FEED], Feed)


def test_feed_counters_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model names the tools: past MAX_TOOLS names, the rest are counted together."""
    from proxy.routes import admin

    monkeypatch.setattr(admin, "MAX_TOOLS", 2)
    feed = admin.Feed()
    base = {"time": "t", "decision": "blocked", "gate": "rules", "reason": "tool_not_allowed"}
    base |= {"action": "strip", "principal": "p", "request_id": "r", "route": "chat"}
    for name in ("a", "b", "c", "d", "a"):
        feed.on_decision({**base, "tool": name})
    assert feed.counters == {
        "a": {"allowed": 0, "blocked": 2, "gates": {"rules": 2}},
        "b": {"allowed": 0, "blocked": 1, "gates": {"rules": 1}},
        admin.OTHER_TOOLS: {"allowed": 0, "blocked": 2, "gates": {"rules": 2}},
    }
