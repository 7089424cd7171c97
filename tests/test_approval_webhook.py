"""Approval webhooks (signed, retried, never on the request path) and the CLI over the admin API
(memory store: the approvals live in the server's process)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from aiohttp import web

from proxy.approvals import Notifier
from proxy.cli import main
from tests.test_approval import TOKEN, Admin, admin_token, call, config, passed  # noqa: F401

SECRET = "whsec-test-secret"


class Receiver:
    """A loopback webhook receiver that fails its first `failures` deliveries with a 503."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[tuple[float, bytes, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append((time.monotonic(), await request.read(), dict(request.headers)))
        if len(self.attempts) <= self.failures:
            return web.Response(status=503)
        return web.Response(status=204)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rec = Receiver(failures=1)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    rec.url = str(server.make_url("/hook"))
    return rec


async def test_webhook_signed_and_retried(
    make_proxy: Any, upstream: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CG_TEST_WEBHOOK_SECRET", SECRET)
    cfg = config(notify=receiver.url)
    cfg["server"]["webhook_secret"] = "${CG_TEST_WEBHOOK_SECRET}"
    proxy = await make_proxy(cfg)
    notifier: Notifier = proxy.state.extra["approvals"].notifier  # type: ignore[attr-defined]
    notifier.backoff = 0.5  # the retry comes well after the blocked answer

    message = await call(proxy, upstream, {"to": "acct-9", "amount": 500})
    answered = time.monotonic()
    assert not passed(message)
    await asyncio.wait_for(notifier.drain(), 10)
    assert len(receiver.attempts) == 2  # the first failed (503), the retry was taken
    first, second = receiver.attempts
    # Fire-and-forget: the answer did not wait for the failed attempt's retry.
    assert answered < second[0]
    assert second[0] - first[0] >= 0.45  # backoff before the retry
    body, headers = second[1], second[2]
    assert first[1] == body  # the same delivery, byte for byte
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Callgate-Signature"] == expected
    assert headers["X-Callgate-Event"] == "approval.requested"
    payload = json.loads(body)
    [pending] = await Admin(proxy.root).pending()
    assert payload["event"] == "approval.requested"
    assert payload["approval"]["id"] == pending["id"]
    assert payload["approval"]["arguments"] == {"to": "acct-9", "amount": 500}
    assert payload["approval"]["state"] == "pending"
    # A tampered body does not match the signature.
    forged = body.replace(b"500", b"501")
    assert hmac.new(SECRET.encode(), forged, hashlib.sha256).hexdigest() != expected[7:]

    # The identical call again reuses the pending approval: no second webhook.
    await call(proxy, upstream, {"to": "acct-9", "amount": 500})
    await notifier.drain()
    assert len(receiver.attempts) == 2


async def test_webhook_gives_up_after_bounded_attempts(aiohttp_server: Any) -> None:
    rec = Receiver(failures=100)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    notifier = Notifier(SECRET, attempts=3, backoff=0.01)
    notifier.send(str(server.make_url("/hook")), "approval.requested", {"id": "apr_1"})
    await asyncio.wait_for(notifier.drain(), 5)
    await notifier.close()
    assert len(rec.attempts) == 3 and notifier.failed == 1 and notifier.delivered == 0


async def test_cli_over_the_admin_api(
    make_proxy: Any, upstream: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await make_proxy(config())
    policy_file = tmp_path / "callgate.yaml"
    policy_file.write_text(json.dumps({**config(), "upstream": {"base_url": upstream.url}}))
    args = {"to": "acct-9", "amount": 500}
    assert not passed(await call(proxy, upstream, args))

    def cli(*argv: str) -> tuple[int, str]:
        code = main([*argv, "--config", str(policy_file), "--url", proxy.root])
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(cli, "approvals", "list")
    [listed] = [json.loads(line) for line in out.splitlines() if line.startswith('{"id"')]
    assert code == 0 and listed["arguments"] == args
    code, out = await asyncio.to_thread(cli, "approvals", "deny", listed["id"], "--comment", "no")
    assert code == 0 and f"denied {listed['id']}" in out
    reply = await call(proxy, upstream, args)
    assert not passed(reply) and "Approval denied" in reply.content and ": no." in reply.content
