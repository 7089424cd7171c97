"""Virtual keys on the Redis store: two replicas sharing a real redis-server see a key made by
the CLI, and stop honouring it within `auth.keys_refresh` of its revocation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from proxy.cli import main
from tests.conftest import completion, records
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

REFRESH = 0.25  # auth.keys_refresh here; the default is 2s


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: Any) -> None:
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


async def test_two_replicas_share_keys_and_revocations(
    make_proxy: Any, upstream: Any, tmp_path: Path, capsys: Any, redis_server: RedisServer
) -> None:
    config = {
        "upstream": {"base_url": upstream.url, "api_key": "sk-upstream"},
        "store": {"backend": "redis", "url": redis_server.url, "key_prefix": "cgtest:"},
        "auth": {"modes": ["keys"], "keys_refresh": REFRESH},
    }
    path = tmp_path / "callgate.yaml"
    path.write_text(yaml.safe_dump(config))
    first = await make_proxy(config, config_path=str(path))
    second = await make_proxy(config, config_path=str(path))

    capsys.readouterr()
    assert main(["keys", "create", "--config", str(path), "--principal", "dana"]) == 0
    out = capsys.readouterr().out.splitlines()
    key, key_id = out[-1], out[0].removeprefix("id: ")
    assert not (tmp_path / "callgate.keys.json").exists()  # Redis holds them, not a file

    clients = []
    for proxy in (first, second):
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0)
        proxy.clients.append(client)
        clients.append(client)

    async def works(client: openai.AsyncOpenAI) -> bool:
        upstream.push({"object": "list", "data": []})
        try:
            await client.models.list()
        except openai.AuthenticationError:
            upstream.replies.clear()
            return False
        return True

    async def until(expect: bool, limit: float) -> list[float]:
        started = time.monotonic()
        seen = []
        for client in clients:
            while await works(client) != expect:
                assert time.monotonic() - started < limit, f"still {not expect} after {limit}s"
                await asyncio.sleep(0.02)
            seen.append(time.monotonic() - started)
        return seen

    await until(True, REFRESH + 2.0)  # created after both started: picked up by both

    seen = records(second)
    upstream.push(completion(("lookup", {})))
    await clients[1].chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert seen[0]["principal"] == "dana" and seen[0]["credential"] == key_id

    revoked_at = time.monotonic()
    assert main(["keys", "revoke", key_id, "--config", str(path)]) == 0
    await until(False, REFRESH + 2.0)
    took = time.monotonic() - revoked_at
    # Stated bound: keys_refresh plus a Redis round trip (and this test's polling).
    assert took < REFRESH + 0.5, took
