"""Virtual keys (auth mode `keys`, memory store): the CLI, the real openai SDK with `api_key=`,
401s that never reach the upstream, the principal no header can override, revocation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.auth.keys import FileKeys, KeyRecord, digest, new_id
from proxy.cli import main
from tests.conftest import completion, records

UPSTREAM_KEY = "sk-upstream-secret-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: Any) -> None:
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


def policy(tmp_path: Path, upstream_url: str, **auth: Any) -> tuple[dict[str, Any], str]:
    config: dict[str, Any] = {
        "upstream": {"base_url": upstream_url, "api_key": UPSTREAM_KEY},
        "auth": {"modes": ["keys"], "keys_refresh": 0.1, **auth},
        "tools": {"get_weather": {"rate_limit": {"max_calls": 1, "window": 60}}},
    }
    path = tmp_path / "callgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, str(path)


def create_key(config_path: str, capsys: Any, *extra: str) -> tuple[str, str]:
    """(key, id) from `callgate keys create`: the key is the last line."""
    capsys.readouterr()
    assert main(["keys", "create", "--config", config_path, *extra]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[-1]
    key_id = next(line.split(": ", 1)[1] for line in out if line.startswith("id: "))
    return key, key_id


def test_create_prints_key_once_and_stores_only_its_digest(tmp_path: Path, capsys: Any) -> None:
    _, path = policy(tmp_path, "http://127.0.0.1:9/v1")
    key, key_id = create_key(
        path, capsys, "--principal", "alice", "--group", "eng", "--group", "ops", "--note", "ci"
    )
    assert key.startswith("cg-") and len(key) >= 3 + 32  # 192 random bits, URL-safe
    stored = (tmp_path / "callgate.keys.json").read_text()  # default: beside the policy
    assert key not in stored and key[3:] not in stored
    assert digest(key) in stored
    assert (tmp_path / "callgate.keys.json").stat().st_mode & 0o077 == 0

    capsys.readouterr()
    assert main(["keys", "list", "--config", path]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and '"groups":["eng","ops"]' in listed and '"status":"active"' in listed
    assert key not in listed and digest(key) not in listed  # a 12-hex prefix at most

    assert main(["keys", "revoke", key_id, "--config", path]) == 0
    assert main(["keys", "list", "--config", path]) == 0
    assert '"status":"revoked"' in capsys.readouterr().out
    assert main(["keys", "revoke", "key_nope", "--config", path]) == 1

    second, _ = create_key(path, capsys, "--principal", "bob", "--expires", "30d")
    assert second != key
    assert len(FileKeys(str(tmp_path / "callgate.keys.json")).list()) == 2


async def test_key_through_openai_sdk(
    make_proxy: Any, upstream: Any, tmp_path: Path, capsys: Any
) -> None:
    config, path = policy(tmp_path, upstream.url)
    key, key_id = create_key(path, capsys, "--principal", "alice", "--group", "eng")
    proxy = await make_proxy(config, config_path=path)
    seen = records(proxy)
    upstream.push(completion(("get_weather", {"city": "Paris"})))
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0)
    proxy.clients.append(client)
    # A header and a body field that used to pick the principal: ignored once authenticated.
    result = await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        user="mallory",
        extra_headers={"x-callgate-principal": "mallory"},
    )
    assert result.choices[0].message.tool_calls[0].function.name == "get_weather"
    sent = upstream.received[-1].headers
    assert sent["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # the upstream's key, not ours
    assert all(key not in v for v in sent.values())
    assert "x-callgate-principal" not in {h.lower() for h in sent}
    assert seen[0]["principal"] == "alice"
    assert list(seen[0]["groups"]) == ["eng"]
    assert seen[0]["credential"] == key_id

    # alice's own limit (1 per minute) binds, whatever name she claims.
    upstream.push(completion(("get_weather", {"city": "Oslo"})), completion(content="ok"))
    await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "again"}],
        extra_headers={"x-callgate-principal": "someone-else"},
    )
    assert seen[1]["principal"] == "alice" and seen[1]["decision"] == "blocked"

    # The pass-through needs the key too, and does not forward it.
    upstream.push({"object": "list", "data": []})
    await client.models.list()
    assert upstream.received[-1].path == "/v1/models"
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_bad_credentials_are_401_and_never_reach_upstream(
    make_proxy: Any, upstream: Any, tmp_path: Path, capsys: Any
) -> None:
    config, path = policy(tmp_path, upstream.url)
    create_key(path, capsys, "--principal", "alice")  # a valid key exists: others still fail
    keys = FileKeys(str(tmp_path / "callgate.keys.json"))
    expired = "cg-" + "e" * 32
    keys.add(KeyRecord(new_id(), digest(expired), "old", [], time.time() - 100, time.time() - 1))
    revoked = "cg-" + "r" * 32
    keys.add(KeyRecord(new_id(), digest(revoked), "gone", [], time.time(), None, time.time()))
    proxy = await make_proxy(config, config_path=path)
    cases = {
        "unknown": "cg-" + "u" * 32,
        "expired": expired,
        "revoked": revoked,
        "malformed": "sk-not-a-callgate-key",
    }
    for reason, credential in cases.items():
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key=credential, max_retries=0)
        proxy.clients.append(client)
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="m", messages=[])
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key", reason
        assert credential not in str(caught.value.body)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    # No credential at all (the SDK insists on one: send the request by hand).
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/chat/completions", json={}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(proxy.root + "/healthz") as resp:
            assert resp.status == 200  # probes need no credential
        async with http.get(proxy.root + "/metrics") as resp:
            metrics = await resp.text()
    assert upstream.received == []
    for reason, count in (("unknown", 2), ("expired", 2), ("revoked", 2), ("missing", 1)):
        assert f'callgate_auth_failures_total{{reason="{reason}"}} {count}.0' in metrics
    assert 'callgate_auth_failures_total{reason="malformed"} 2.0' in metrics


async def test_revoked_and_new_keys_apply_within_keys_refresh(
    make_proxy: Any, upstream: Any, tmp_path: Path, capsys: Any
) -> None:
    config, path = policy(tmp_path, upstream.url)
    proxy = await make_proxy(config, config_path=path)
    key, key_id = create_key(path, capsys, "--principal", "carol")  # made after the start
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0)
    proxy.clients.append(client)

    async def works() -> bool:
        upstream.push({"object": "list", "data": []})
        try:
            await client.models.list()
        except openai.AuthenticationError:
            upstream.replies.clear()
            return False
        return True

    async def within(expect: bool, limit: float) -> float:
        started = time.monotonic()
        while await works() != expect:
            assert time.monotonic() - started < limit, f"key still {not expect} after {limit}s"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    assert await within(True, 2.0) < 1.0  # keys_refresh is 0.1s here
    assert main(["keys", "revoke", key_id, "--config", path]) == 0
    assert await within(False, 2.0) < 1.0
