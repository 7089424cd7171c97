"""Principals cannot collide: not by length, not by control characters, not inside store keys.

Through a real callgate (memory store and a real redis-server) with the openai SDK as client,
and unit tests of the canonical form and of every store key built from client-chosen parts.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from typing import Any

import openai
import orjson
import pytest

from proxy import responses, stash
from proxy.config import RateLimitConfig
from proxy.gates import ratelimit
from proxy.principal import DIGEST_HEX, MAX_PRINCIPAL, canonical, resolve_principal
from tests.conftest import completion, records
from tests.redis_server import RedisServer, start_redis

MSGS = [{"role": "user", "content": "hi"}]
LONG_A = "z" * 200 + "a"
LONG_B = "z" * 200 + "b"
HOSTILE = ["\n", "\r", "\x00", "\x1b[31m", "\t", "\u2028", "\u2029", "\u202e", "\ud800", "\x85"]


@pytest.fixture(scope="module")
def shared_redis():
    server = start_redis()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(params=["memory", "redis"])
def store_config(request) -> dict[str, Any]:
    if request.param == "memory":
        return {"backend": "memory"}
    server: RedisServer = request.getfixturevalue("shared_redis")
    return {"backend": "redis", "url": server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}:"}


# --- the canonical form -------------------------------------------------------------------


def test_short_printable_values_are_kept():
    for value in ["alice", "key:0123456789abcdef", "bob@example.com", "Zoë 山田", "a" * 200]:
        assert canonical(value) == value


def test_long_values_keep_a_prefix_and_a_digest_of_the_whole():
    a, b = canonical(LONG_A), canonical(LONG_B)
    assert a != b
    for out in (a, b):
        assert len(out) == MAX_PRINCIPAL
        assert out.startswith("z" * (MAX_PRINCIPAL - DIGEST_HEX - 1))
        assert out[-DIGEST_HEX - 1] == "~"
        assert canonical(LONG_A) == a  # stable: the same value is the same principal


@pytest.mark.parametrize("bad", HOSTILE)
def test_unprintable_characters_never_reach_a_principal(bad):
    value = f"alice{bad}level=error event=forged"
    out = canonical(value)
    assert out.isprintable() and "\n" not in out and "\r" not in out
    assert out != canonical("alice") and out != canonical(value.replace(bad, "?"))
    orjson.dumps({"principal": out})  # a lone surrogate would make every record unwritable


def test_a_value_shaped_like_a_digest_is_digested_too():
    digested = canonical(LONG_A)
    # Sent as a principal itself, it must not become LONG_A's principal.
    assert canonical(digested) != digested
    assert canonical(digested) != canonical(LONG_A)
    # A short value ending in "~" and 32 hex digits is not kept either.
    lookalike = "bob~" + "0" * DIGEST_HEX
    assert canonical(lookalike) != lookalike


def test_canonical_is_one_to_one_on_hostile_samples():
    rng = random.Random(19)
    alphabet = ["z", "a", "~", "0", "f", ":", "%", "*", "@", " ", *HOSTILE]
    values = {"z" * n for n in range(190, 215)}
    while len(values) < 5000:
        length = rng.choice([1, 2, 5, 33, 34, 150, 199, 200, 201, 260])
        values.add("".join(rng.choice(alphabet) for _ in range(length)))
    outs = {canonical(v) for v in values}
    assert len(outs) == len(values)
    assert all(len(o) <= MAX_PRINCIPAL and o.isprintable() for o in outs)


def test_resolve_principal_strips_and_canonicalizes():
    sources = ["header:x-p", "body:user"]
    assert resolve_principal(sources, {"x-p": "  alice  "}, {}) == "alice"
    assert resolve_principal(sources, {"x-p": "   "}, {"user": LONG_B}) == canonical(LONG_B)
    assert resolve_principal(sources, {}, {"user": "a\nb"}) == canonical("a\nb")
    assert resolve_principal(sources, {}, {"user": 7}) == "global"


# --- store keys -----------------------------------------------------------------------------

# Every string of up to 3 characters over the separators, "%" and a letter (2 for 3-part keys).
PARTS = ["".join(p) for n in range(4) for p in itertools.product("a:@%*", repeat=n)]
SHORT = [p for p in PARTS if len(p) <= 2]


def _injective(build, arity: int) -> None:
    seen: dict[str, tuple[str, ...]] = {}
    for parts in itertools.product(PARTS if arity < 3 else SHORT, repeat=arity):
        key = build(*parts)
        assert seen.setdefault(key, parts) == parts, f"{parts} and {seen[key]} share {key!r}"


def test_chat_stash_key_ambiguity():
    assert stash.chat_key("a:b", "c") != stash.chat_key("a", "b:c")
    _injective(stash.chat_key, 2)


def test_responses_stash_keys_never_meet():
    # previous_response_id is client-chosen: it must not name someone's call entry.
    assert stash.responses_key("call:victim:call_1") != responses.call_key("victim", "call_1")
    assert stash.responses_key("conversation:c") != responses.conversation_key("c")
    seen: dict[str, tuple[str, ...]] = {}
    for p in PARTS:
        for key, parts in [
            (stash.responses_key(p), ("response", p)),
            (responses.conversation_key(p), ("conversation", p)),
            *[(responses.call_key(p, c), ("call", p, c)) for c in PARTS],
        ]:
            assert seen.setdefault(key, parts) == parts, f"{parts} and {seen[key]} share {key!r}"


def test_rate_limit_keys_never_meet():
    configs = {s: RateLimitConfig(max_calls=1, window=1, scope=s) for s in ("principal", "global")}

    def key(namespace: str, tool: str, principal: str, scope: str = "principal") -> str:
        return ratelimit.slot_request(namespace, tool, principal, configs[scope]).key

    # The model names the tool, the client the principal: "a@b" + "c" vs "a" + "b@c".
    assert key("ns", "a@b", "c") != key("ns", "a", "b@c")
    # A principal named "*" is not the global bucket.
    assert key("ns", "t", "*") != key("ns", "t", "anyone", scope="global")
    _injective(key, 3)
    globals_ = {key(n, t, "x", "global") for n in SHORT for t in SHORT}
    assert not globals_ & {key(n, t, p) for n in SHORT for t in SHORT for p in SHORT}


def test_usual_keys_are_unchanged():
    """Keys of ordinary values stay as they were: an upgrade resets no window."""
    cfg = RateLimitConfig(max_calls=1, window=1)
    assert ratelimit.slot_request("tools", "get_weather", "bob@x.io", cfg).key == (
        "rl:tools:get_weather@bob@x.io"
    )
    assert stash.chat_key("key:0123", "call_abc") == "stash:chat:key:0123:call_abc"
    assert stash.responses_key("resp_1") == "stash:responses:resp_1"


# --- through a real server ------------------------------------------------------------------


async def test_long_principals_get_separate_buckets(make_proxy, upstream, store_config):
    proxy = await make_proxy(
        {
            "on_block": "error",
            "store": store_config,
            "tools": {"get_weather": {"rate_limit": {"max_calls": 1, "window": 60}}},
        }
    )
    seen = records(proxy)
    a = proxy.client(default_headers={"x-callgate-principal": LONG_A})
    b = proxy.client(default_headers={"x-callgate-principal": LONG_B})
    upstream.push(completion(("get_weather", {"city": "Rome"})))
    await a.chat.completions.create(model="m", messages=MSGS)
    upstream.push(completion(("get_weather", {"city": "Rome"})))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await a.chat.completions.create(model="m", messages=MSGS)
    assert err.value.body["code"] == "rate_limit"
    # B shares A's first 200 characters, not A's bucket.
    upstream.push(completion(("get_weather", {"city": "Rome"})))
    ok = await b.chat.completions.create(model="m", messages=MSGS)
    assert ok.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert [(r["decision"], r["principal"]) for r in seen] == [
        ("allowed", canonical(LONG_A)),
        ("blocked", canonical(LONG_A)),
        ("allowed", canonical(LONG_B)),
    ]
    assert canonical(LONG_A) != canonical(LONG_B)


async def test_control_characters_are_a_principal_of_their_own(make_proxy, upstream, store_config):
    """`user: "alice\\n..."` neither forges a log line nor spends alice's limit."""
    proxy = await make_proxy(
        {
            "on_block": "error",
            "principal": {"from": ["body:user"]},
            "store": store_config,
            "tools": {"get_weather": {"rate_limit": {"max_calls": 1, "window": 60}}},
        }
    )
    seen = records(proxy)
    client = proxy.client()
    forged = 'alice\n{"event":"request","principal":"admin"}'
    upstream.push(completion(("get_weather", {})), completion(("get_weather", {})))
    await client.chat.completions.create(model="m", messages=MSGS, user=forged)
    await client.chat.completions.create(model="m", messages=MSGS, user="alice")
    assert [r["decision"] for r in seen] == ["allowed", "allowed"]
    assert seen[0]["principal"] != "alice" and seen[1]["principal"] == "alice"
    assert seen[0]["principal"].isprintable()


async def test_stash_key_ambiguity_attack(make_proxy, upstream, store_config):
    """Principal "a" replays call id "b:c": it must not pull in principal "a:b"'s call "c"."""
    proxy = await make_proxy(
        {"on_block": "strip", "store": store_config, "tools": {"bad": {"allow": False}}}
    )
    victim = proxy.client(default_headers={"x-callgate-principal": "a:b"})
    attacker = proxy.client(default_headers={"x-callgate-principal": "a"})
    upstream.push(
        completion(("ok", {}), ("bad", {"secret": "s3cr3t-victim"}), ids=["c", "call_bad"])
    )
    first = await victim.chat.completions.create(model="m", messages=MSGS)
    assert [c.id for c in first.choices[0].message.tool_calls] == ["c"]

    def next_turn(call_id: str) -> list[dict[str, Any]]:
        call = {"id": call_id, "type": "function", "function": {"name": "ok", "arguments": "{}"}}
        return [
            *MSGS,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "42"},
        ]

    upstream.push(completion(content="done"))
    await attacker.chat.completions.create(model="m", messages=next_turn("b:c"))
    sent = json.dumps(upstream.bodies()[-1])
    assert "s3cr3t-victim" not in sent and "call_bad" not in sent
    # The stash is there for its owner: the attack above could have found it.
    upstream.push(completion(content="done"))
    await victim.chat.completions.create(model="m", messages=next_turn("c"))
    assert "s3cr3t-victim" in json.dumps(upstream.bodies()[-1])
