"""Approvers by JWT groups: /admin accepts a verified JWT that carries groups, which may see and
answer only the approvals whose tool's `approvers` share one of its groups (no `approvers`:
anyone's); the admin token stays a superuser; the approval events name the JWT's principal.

Real parts: the app on loopback, the openai SDK as the agent (itself authenticated by JWT),
tokens signed with a static EC key (and a JWKS served on loopback for the /admin-only setup).
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import completion
from tests.test_approval import Admin
from tests.test_auth_jwt import AUDIENCE, ISSUER, Jwks, jwks, token

__all__ = ["jwks"]  # the JWKS fixture, used below

TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwt_section(**keys: Any) -> dict[str, Any]:
    return {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["ES256", "RS256"],
        "principal_claim": "sub",
        "groups_claim": "groups",
        **keys,
    }


def config(key: Any, modes: list[str]) -> dict[str, Any]:
    return {
        "on_block": "strip",
        "server": {"admin_token": TOKEN},
        "auth": {"modes": modes, "jwt": jwt_section(public_keys=[pem(key)])},
        "tools": {
            "transfer": {"approval": {"approvers": ["finance", "treasury"], "ttl": 600}},
            "deploy": {"approval": {"ttl": 600}},  # no approvers: any admin
        },
    }


def jwt_for(key: Any, sub: str, groups: list[str] | None, **claims: Any) -> str:
    extra = {} if groups is None else {"groups": groups}
    return token(key, None, "ES256", sub=sub, **extra, **claims)


async def agent_call(proxy: Any, upstream: Any, credential: str, tool: str, args: Any) -> bool:
    """The agent (alice, by her JWT) makes one call; True when it reached the client."""
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=credential, max_retries=0)
    proxy.clients.append(client)
    upstream.push(completion((tool, args)))
    resp = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "go"}]
    )
    calls = resp.choices[0].message.tool_calls or []
    return [c.function.name for c in calls] == [tool]


async def test_jwt_approvers_by_group(make_proxy: Any, upstream: Any, key: Any) -> None:
    proxy = await make_proxy(config(key, ["jwt"]))
    events: list[dict[str, Any]] = []
    proxy.state.auditor.event_listeners.append(events.append)
    alice = jwt_for(key, "alice", ["eng"])
    pay = {"to": "acct-9", "amount": 500}
    ship = {"service": "api", "env": "prod"}
    assert not await agent_call(proxy, upstream, alice, "transfer", pay)
    assert not await agent_call(proxy, upstream, alice, "deploy", ship)

    superuser = Admin(proxy.root, TOKEN)
    both = {a["tool"]: a for a in await superuser.pending()}
    assert set(both) == {"transfer", "deploy"} and both["transfer"]["principal"] == "alice"

    # bob (support) sees only what he may answer: deploy (no approvers), not transfer.
    bob = Admin(proxy.root, jwt_for(key, "bob", ["support"]))
    assert [a["tool"] for a in await bob.pending()] == ["deploy"]
    status, body = await bob.approve(both["transfer"]["id"])
    assert status == 403 and body["error"]["code"] == "not_an_approver"
    status, body = await bob.request("GET", f"/admin/approvals/{both['transfer']['id']}")
    assert status == 403
    assert (await superuser.pending())[0]["state"] == "pending"  # nothing was answered
    status, body = await bob.approve(both["deploy"]["id"], "release window")
    assert status == 200 and body["decided_by"] == "bob" and body["decided_via"] == "jwt"
    assert events[-1]["event"] == "approval.approved" and events[-1]["by"] == "bob"
    assert events[-1]["via"] == "jwt" and events[-1]["credential"].startswith("jwt:")

    # carol (treasury, one of the listed groups) may answer transfer; she denies it.
    carol = Admin(proxy.root, jwt_for(key, "carol", ["ops", "treasury"], jti="tok-carol-1"))
    [mine] = await carol.pending()
    assert mine["id"] == both["transfer"]["id"]
    status, body = await carol.deny(mine["id"], "wrong account")
    assert status == 200 and body["state"] == "denied" and body["decided_by"] == "carol"
    assert events[-1] == {
        **events[-1],
        "event": "approval.denied",
        "by": "carol",
        "via": "jwt",
        "credential": "jwt:tok-carol-1",
        "comment": "wrong account",
        "approval": mine["id"],
    }

    # The agent's identical retries: the deploy passes once, the transfer stays denied.
    assert await agent_call(proxy, upstream, alice, "deploy", ship)
    assert not await agent_call(proxy, upstream, alice, "transfer", pay)

    # The admin token answers anything (a superuser); its events say so.
    assert not await agent_call(proxy, upstream, alice, "transfer", {**pay, "amount": 501})
    [fresh] = await superuser.pending()
    assert (await bob.approve(fresh["id"]))[0] == 403
    status, body = await superuser.approve(fresh["id"])
    assert status == 200 and body["decided_by"] == "admin-token"
    assert events[-1]["by"] == "admin-token" and events[-1]["via"] == "admin_token"


async def test_jwt_admin_refusals(make_proxy: Any, upstream: Any, key: Any) -> None:
    proxy = await make_proxy(config(key, ["jwt"]))
    other = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    refused = {
        "wrong key": jwt_for(other, "eve", ["finance"]),
        "expired": jwt_for(key, "eve", ["finance"], iat=now - 900, exp=now - 600),
        "wrong audience": jwt_for(key, "eve", ["finance"], aud="another-service"),
        "not a jwt": "eve-finance",
    }
    for why, credential in refused.items():
        status, body = await Admin(proxy.root, credential).request("GET", "/admin/approvals")
        assert status == 401, why
        assert body["error"]["code"] == "invalid_admin_token", why
        status, _ = await Admin(proxy.root, credential).approve("apr_x")
        assert status == 401, why
    # Verified, but without groups: not an approver of anything.
    for groups in (None, []):
        status, body = await Admin(proxy.root, jwt_for(key, "eve", groups)).request(
            "GET", "/admin/approvals"
        )
        assert status == 403 and body["error"]["code"] == "not_an_approver"
    status, body = await Admin(proxy.root, jwt_for(key, "eve", ["x"])).request(
        "GET", "/admin/decisions"
    )
    assert status == 200 and body["data"] == []


async def test_jwt_admins_without_v1_jwt_mode(
    make_proxy: Any, upstream: Any, jwks: Jwks, key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auth.jwt` configured while /v1 is open (`modes: [none]`) and no admin token: /admin
    verifies JWTs itself (here against a JWKS on loopback), and exists because of them."""
    jwks.keys = {"k1": key}
    cfg = config(key, ["none"])
    cfg["server"] = {}
    cfg["auth"]["jwt"] = jwt_section(jwks_url=jwks.url)
    proxy = await make_proxy(cfg)
    upstream.push(completion(("transfer", {"amount": 1})))
    await proxy.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "go"}],
        extra_headers={"X-Callgate-Principal": "alice"},
    )
    finance = Admin(proxy.root, token(key, "k1", "ES256", sub="fin-1", groups=["finance"]))
    [pending] = await finance.pending()
    status, body = await finance.approve(pending["id"])
    assert status == 200 and body["decided_by"] == "fin-1"
    assert jwks.fetches >= 1
    # The admin token is not configured: it is just a wrong credential.
    status, _ = await Admin(proxy.root, TOKEN).request("GET", "/admin/approvals")
    assert status == 401
    # The page is there (it is static; the JWT is asked for by its script).
    async with aiohttp.ClientSession() as session, session.get(proxy.root + "/admin") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
