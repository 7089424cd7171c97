"""APIs where the model's tool calls would bypass the gates are refused unless opted in."""

from __future__ import annotations

import json

import aiohttp
import pytest

from proxy.paths import ungated_api

REFUSED = [
    ("POST", "/v1/threads/thread_1/runs", "assistants"),
    ("POST", "/v1/threads/runs", "assistants"),
    ("POST", "/v1/threads/thread_1/runs/run_1/submit_tool_outputs", "assistants"),
    ("GET", "/v1/threads/thread_1/runs/run_1", "assistants"),
    ("POST", "/v1/batches", "batches"),
    ("GET", "/v1/realtime?model=gpt-4o-realtime", "realtime"),
]


@pytest.mark.parametrize("method,path,api", REFUSED)
async def test_ungated_api_is_refused_by_default(make_proxy, upstream, method, path, api):
    proxy = await make_proxy({})
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, proxy.root + path, json={} if method == "POST" else None) as resp,
    ):
        assert resp.status == 403
        error = json.loads(await resp.read())["error"]
    assert error["code"] == "ungated_api" and api in error["message"]
    assert upstream.received == []


@pytest.mark.parametrize("method,path,api", REFUSED)
async def test_listed_ungated_api_is_forwarded(make_proxy, upstream, method, path, api):
    proxy = await make_proxy({"server": {"ungated_apis": [api]}})
    upstream.push({"object": "ok"})
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, proxy.root + path, json={} if method == "POST" else None) as resp,
    ):
        assert resp.status == 200
    assert [r.path for r in upstream.received] == [path.split("?")[0]]


def test_only_whole_segments_match():
    assert ungated_api("/v1/threadsafe") is None
    assert ungated_api("/v1/batches2") is None
    assert ungated_api("/v1/models") is None
    assert ungated_api("/v1/files") is None
    assert ungated_api("/v1/threads") == "assistants"


async def test_unknown_api_name_is_a_config_error(make_proxy):
    with pytest.raises(Exception, match="ungated_apis"):
        await make_proxy({"server": {"ungated_apis": ["everything"]}})
