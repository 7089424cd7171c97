"""Auth mode `jwt`: tokens verified against a JWKS served on loopback (with key rotation) or
static PEM keys; expired, wrong-audience, `alg: none` and HS256-with-the-public-key tokens
refused; claims mapped to principal and groups; verification cached per token."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import openai
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import completion, records

ISSUER = "https://idp.test"
AUDIENCE = "callgate"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: Any) -> None:
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


class Jwks:
    """An IdP's JWKS endpoint: serves the public half of the current keys, counts fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.fetches = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        out = []
        for kid, private in self.keys.items():
            if isinstance(private, rsa.RSAPrivateKey):
                jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwk["alg"] = "RS256"
            else:
                jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwk["alg"] = "ES256"
            out.append({**jwk, "kid": kid, "use": "sig"})
        return web.json_response({"keys": out})


@pytest.fixture
async def jwks(aiohttp_server: Any) -> Jwks:
    served = Jwks()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", served.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    served.url = str(server.make_url("/.well-known/jwks.json"))
    return served


def token(private: Any, kid: str | None, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
        "org": {"teams": ["eng", "oncall"]},
        **claims,
    }
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, private, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token made by hand: PyJWT (rightly) refuses to make these two."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def auth_config(upstream_url: str, **jwt_config: Any) -> dict[str, Any]:
    return {
        "upstream": {"base_url": upstream_url, "api_key": "sk-upstream"},
        "auth": {
            "modes": ["jwt"],
            "jwt": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "algorithms": ["RS256", "ES256"],
                "leeway": 5,
                "principal_claim": "sub",
                "groups_claim": "org.teams",
                **jwt_config,
            },
        },
    }


async def call(proxy: Any, upstream: Any, credential: str) -> str | None:
    """None when the request went through, else the 401's message."""
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=credential, max_retries=0)
    proxy.clients.append(client)
    upstream.push(completion(content="ok"))
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    except openai.AuthenticationError as exc:
        upstream.replies.clear()
        assert exc.code == "invalid_api_key"
        return str(exc.body["message"])  # type: ignore[index]
    return None


async def test_jwks_rotation_and_claims(
    make_proxy: Any, upstream: Any, jwks: Jwks, rsa_keys: list[Any]
) -> None:
    old, new = rsa_keys
    jwks.keys = {"k1": old}
    proxy = await make_proxy(auth_config(upstream.url, jwks_url=jwks.url, jwks_min_refresh=0.2))
    assert jwks.fetches == 1  # at start
    seen = records(proxy)
    upstream.push(completion(("get_weather", {"city": "Paris"})))
    client = openai.AsyncOpenAI(
        base_url=proxy.url, api_key=token(old, "k1", sub="alice"), max_retries=0
    )
    proxy.clients.append(client)
    await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], user="mallory"
    )
    assert seen[0]["principal"] == "alice" and seen[0]["groups"] == ["eng", "oncall"]
    assert seen[0]["credential"].startswith("jwt:")
    assert upstream.received[-1].headers["Authorization"] == "Bearer sk-upstream"

    # Verified once: the same token again is a cache hit (no second signature check).
    verifier = proxy.state.extra["auth"].jwt  # type: ignore[attr-defined]
    checks = 0
    real_decode = jwt.decode

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal checks
        checks += 1
        return real_decode(*args, **kw)

    jwt.decode = counting  # type: ignore[assignment]
    try:
        same = token(old, "k1", sub="bob")
        for _ in range(3):
            assert await call(proxy, upstream, same) is None
        assert checks == 1 and len(verifier.cache) == 2
    finally:
        jwt.decode = real_decode  # type: ignore[assignment]

    # Rotation: the IdP adds k2 and drops k1. A k2 token makes callgate refetch (unknown kid).
    jwks.keys = {"k2": new}
    # Past jwks_min_refresh since the last fetch, however fast the steps above ran: the unknown
    # kid may refetch now (within it, refusing is the rate limit doing its job).
    await asyncio.sleep(0.25)
    await_rotation = jwks.fetches
    assert await call(proxy, upstream, token(new, "k2", sub="carol")) is None
    assert jwks.fetches == await_rotation + 1
    # k1 is gone from the JWKS: its tokens stop working, cached or not.
    assert await call(proxy, upstream, same) is not None
    assert await call(proxy, upstream, token(old, "k1")) is not None

    # A made-up kid costs at most one fetch per jwks_min_refresh, however many arrive.
    before = jwks.fetches
    started = time.monotonic()
    for i in range(20):
        assert await call(proxy, upstream, token(new, f"bogus-{i}")) is not None
    allowed = int((time.monotonic() - started) / 0.2) + 1
    assert jwks.fetches - before <= allowed < 20


async def test_bad_tokens_are_refused(
    make_proxy: Any, upstream: Any, jwks: Jwks, rsa_keys: list[Any]
) -> None:
    key = rsa_keys[0]
    jwks.keys = {"k1": key}
    proxy = await make_proxy(auth_config(upstream.url, jwks_url=jwks.url))
    now = int(time.time())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "eve", "exp": now + 600}
    bad = {
        "expired": token(key, "k1", exp=now - 60),  # beyond the 5s leeway
        "wrong audience": token(key, "k1", aud="another-service"),
        "wrong issuer": token(key, "k1", iss="https://evil.test"),
        "alg none": unsigned({"alg": "none", "typ": "JWT", "kid": "k1"}, claims, None),
        "HS256 with the RSA public key": unsigned(
            {"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims, public_pem
        ),
        "other key": token(rsa_keys[1], "k1"),
        "no principal claim": token(key, "k1", sub=None),
        "no exp": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "x"}, key, "RS256", headers={"kid": "k1"}
        ),
        "garbage": "a.b.c",
    }
    for name, credential in bad.items():
        message = await call(proxy, upstream, credential)
        assert message is not None, name
    assert "expired" in (await call(proxy, upstream, bad["expired"]) or "")
    assert upstream.received == []
    # Within the leeway, a just-expired token still works.
    assert await call(proxy, upstream, token(key, "k1", exp=now - 1)) is None
    metrics = proxy.state.metrics.exposition().decode()
    assert 'callgate_auth_failures_total{reason="expired"} 2.0' in metrics
    assert 'callgate_auth_failures_total{reason="invalid"}' in metrics


async def test_static_pem_keys(make_proxy: Any, upstream: Any) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    proxy = await make_proxy(
        auth_config(upstream.url, public_keys=[pem], principal_claim="email", groups_claim=None)
    )
    good = token(private, None, "ES256", email="ann@example.com")
    assert await call(proxy, upstream, good) is None
    assert await call(proxy, upstream, token(private, None, "ES256", email="")) is not None
    other = ec.generate_private_key(ec.SECP256R1())
    assert await call(proxy, upstream, token(other, None, "ES256", email="x@y")) is not None
    # The RS256 allow-listed, but no RSA key is configured: nothing to verify with.
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await call(proxy, upstream, token(rsa_private, None, "RS256")) is not None


def test_config_refuses_none_and_hs_algorithms() -> None:
    from proxy.config import ConfigError
    from proxy.policy import load_policy_text

    for algorithms in (["none"], ["HS256"], ["RS256", "HS512"]):
        text = json.dumps(
            {
                "auth": {
                    "modes": ["jwt"],
                    "jwt": {
                        "jwks_url": "https://x/jwks",
                        "audience": "a",
                        "algorithms": algorithms,
                    },
                }
            }
        )
        with pytest.raises(ConfigError) as caught:
            load_policy_text(text)
        assert "is not allowed" in str(caught.value)
    with pytest.raises(ConfigError, match="audience"):
        load_policy_text('{"auth": {"modes": ["jwt"], "jwt": {"jwks_url": "https://x/j"}}}')
