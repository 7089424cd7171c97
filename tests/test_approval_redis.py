"""Human approval across replicas: two callgate apps on one real redis-server.

Approve on one, use on the other; a grant used by two replicas at once passes once; the CLI
approves straight in Redis and a server puts the answer in its audit chain.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from proxy.audit import verify_file
from proxy.cli import main
from proxy.store.redis import RedisStore
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_approval import TOKEN, Admin, admin_token, call, config, passed  # noqa: F401


async def two_replicas(make_proxy: Any, redis_server: RedisServer, **kw: Any) -> list[Any]:
    cfg = config()
    cfg["store"] = {"backend": "redis", "url": redis_server.url}
    made = []
    for _ in range(2):
        made.append(await make_proxy(cfg, store=RedisStore(redis_server.url), **kw))
    return made


async def test_approve_on_one_use_on_the_other(
    make_proxy: Any, upstream: Any, redis_server: RedisServer
) -> None:
    a, b = await two_replicas(make_proxy, redis_server)
    args = {"to": "acct-9", "amount": 500}
    assert not passed(await call(a, upstream, args))
    # The other replica sees the pending request, and an identical call there reuses it.
    assert not passed(await call(b, upstream, args))
    [pending] = await Admin(b.root).pending()
    assert [p["id"] for p in await Admin(a.root).pending()] == [pending["id"]]

    assert (await Admin(a.root).approve(pending["id"]))[0] == 200
    assert passed(await call(b, upstream, args))
    # Used: neither replica lets it through again.
    assert not passed(await call(a, upstream, args))
    assert not passed(await call(b, upstream, args))


async def test_two_replicas_racing_for_one_grant(
    make_proxy: Any, upstream: Any, redis_server: RedisServer
) -> None:
    a, b = await two_replicas(make_proxy, redis_server)
    for round_ in range(8):
        args = {"to": f"acct-{round_}", "amount": 500}
        assert not passed(await call(a, upstream, args))
        [pending] = await Admin(a.root).pending()
        assert (await Admin(b.root).approve(pending["id"]))[0] == 200
        results = await asyncio.gather(call(a, upstream, args), call(b, upstream, args))
        assert sum(passed(m) for m in results) == 1, round_
        # The loser asked again: a new request is pending; deny it for the next round.
        [fresh] = await Admin(a.root).pending()
        assert fresh["id"] != pending["id"]
        assert (await Admin(a.root).deny(fresh["id"]))[0] == 200


async def test_cli_approves_in_redis_and_a_server_audits_it(
    make_proxy: Any,
    upstream: Any,
    redis_server: RedisServer,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    audit_file = tmp_path / "audit.jsonl"
    cfg = config()
    cfg["store"] = {"backend": "redis", "url": redis_server.url}
    cfg["audit"] = {"file": str(audit_file)}
    # The real clock: the CLI (another process, in effect) reads expiry times by it.
    proxy = await make_proxy(cfg, store=RedisStore(redis_server.url), clock=time.time)
    policy_file = tmp_path / "callgate.yaml"
    policy_file.write_text(json.dumps({**cfg, "upstream": {"base_url": upstream.url}}))
    args = {"to": "acct-9", "amount": 500}
    assert not passed(await call(proxy, upstream, args))

    def cli(*argv: str) -> tuple[int, str]:
        code = main([*argv, "--config", str(policy_file)])
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(cli, "approvals", "list")
    assert code == 0
    # (The server's own log lines share the captured stdout.)
    [listed] = [json.loads(line) for line in out.splitlines() if line.startswith('{"id"')]
    assert listed["tool"] == "transfer" and listed["arguments"] == args
    code, out = await asyncio.to_thread(
        cli, "approvals", "approve", listed["id"], "--comment", "checked"
    )
    assert code == 0 and f"approved {listed['id']} (transfer for alice)" in out
    code, _ = await asyncio.to_thread(cli, "approvals", "deny", listed["id"])
    assert code == 1  # answered already

    # The server takes the CLI's event into its chain (within its polling interval).
    events: list[dict[str, Any]] = []
    proxy.state.auditor.event_listeners.append(events.append)
    approvals = proxy.state.extra["approvals"]
    for _ in range(100):
        if events:
            break
        await asyncio.sleep(0.05)
    [event] = events
    assert event["event"] == "approval.approved" and event["by"].startswith("cli")
    assert event["comment"] == "checked" and event["approval"] == listed["id"]
    assert await approvals.take_events() == 0  # taken once

    assert passed(await call(proxy, upstream, args))
    await proxy.state.auditor.durable()
    lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
    kinds = [line.get("event") or line["reason"] or line["decision"] for line in lines]
    assert kinds == ["approval_required", "approval.approved", "allowed"]
    assert lines[-1]["approval"] == {"id": listed["id"], "state": "used"}
    count, problem = verify_file(str(audit_file))
    assert problem is None and count == 3
