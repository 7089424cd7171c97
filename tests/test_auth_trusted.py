"""Auth mode `trusted_header`: the principal header counts only from a listed peer address.

Loopback is a /8 on Linux: the client binds 127.0.0.2 to be a peer that is not listed."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import completion, records


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: Any) -> None:
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


def client_from(proxy: Any, source: str) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=source))
    client = openai.AsyncOpenAI(
        base_url=proxy.url, api_key="unused", max_retries=0, http_client=http
    )
    proxy.clients.append(client)
    return client


async def test_header_honoured_only_from_listed_peers(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(
        {
            "upstream": {"api_key": "sk-upstream"},
            "auth": {
                "modes": ["trusted_header"],
                "trusted_header": {
                    "header": "x-forwarded-user",
                    "groups_header": "x-forwarded-groups",
                    "peers": ["127.0.0.1/32", "10.0.0.0/8"],
                },
            },
        }
    )
    seen = records(proxy)
    headers = {"x-forwarded-user": "frank", "x-forwarded-groups": "eng, ops"}

    upstream.push(completion(("lookup", {})))
    trusted = client_from(proxy, "127.0.0.1")
    await trusted.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers=headers
    )
    assert seen[0]["principal"] == "frank" and seen[0]["groups"] == ["eng", "ops"]
    assert seen[0]["credential"] == "peer:127.0.0.1"
    # The client's own Authorization is not the upstream's: replaced by upstream.api_key.
    assert upstream.received[-1].headers["Authorization"] == "Bearer sk-upstream"

    # From the listed peer but without the header: no credential at all.
    with pytest.raises(openai.AuthenticationError):
        await trusted.models.list()

    untrusted = client_from(proxy, "127.0.0.2")
    with pytest.raises(openai.AuthenticationError) as caught:
        await untrusted.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers=headers
        )
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await untrusted.models.list(extra_headers=headers)
    assert len(upstream.received) == 1
    metrics = proxy.state.metrics.exposition().decode()
    assert 'callgate_auth_failures_total{reason="untrusted_peer"} 2.0' in metrics
    # The SDK sent its (dummy) api_key, which no mode accepts.
    assert 'callgate_auth_failures_total{reason="malformed"} 1.0' in metrics


async def test_modes_in_order_key_first_then_header(
    make_proxy: Any, upstream: Any, tmp_path: Any
) -> None:
    """[keys, trusted_header]: a presented key decides (a bad one does not fall through)."""
    from proxy.auth.keys import FileKeys, KeyRecord, digest

    key = "cg-" + "k" * 32
    FileKeys(str(tmp_path / "keys.json")).add(KeyRecord("key_1", digest(key), "kim", ["ops"], 0.0))
    proxy = await make_proxy(
        {
            "auth": {
                "modes": ["keys", "trusted_header"],
                "keys_file": str(tmp_path / "keys.json"),
                "trusted_header": {"peers": ["127.0.0.1"]},
            },
        }
    )
    seen = records(proxy)
    upstream.push(completion(("lookup", {})), completion(("lookup", {})))
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address="127.0.0.1"))
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0, http_client=http)
    proxy.clients.append(client)
    header = {"x-callgate-principal": "root"}
    await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers=header
    )
    assert seen[0]["principal"] == "kim"
    # Without auth.upstream key, the client's callgate key is still never forwarded.
    assert "Authorization" not in upstream.received[-1].headers
    bad = client.with_options(api_key="cg-" + "x" * 32)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers=header
        )
    sidecar = client_from(proxy, "127.0.0.1")
    await sidecar.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={**header, "Authorization": ""},
    )
    assert seen[-1]["principal"] == "root"
