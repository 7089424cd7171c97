"""OpenTelemetry traces, exported over real OTLP/HTTP to a receiver on loopback.

The receiver is a small aiohttp server decoding the protobuf `ExportTraceServiceRequest`
payloads callgate's exporter posts (opentelemetry-proto). The client is the openai SDK, whose
`traceparent` header callgate continues; the scripted upstream records the `traceparent` it
receives, which must name callgate's round span.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from proxy.audit import verify_chain
from proxy.config import TelemetryConfig
from proxy.telemetry import TelemetryError, exporters
from tests.conftest import SSE, completion, records
from tests.responses_streams import USAGE, FakeResponses, fc, msg, response
from tests.streams import chat_stream

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
TOOLS = [{"type": "function", "name": "delete_file", "parameters": {"type": "object"}}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "delete_file", "parameters": {}}}]
POLICY = {
    "tools": {"delete_file": {"allow": False}},
    "principal": {"from": ["header:x-callgate-principal"]},
    "audit": {"redact": ["password"]},
}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Spans:
    """What the receiver decoded: spans as plain dicts, and the resources they came with."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    posts: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        payload = ExportTraceServiceRequest()
        payload.ParseFromString(await request.read())
        self.posts += 1
        for rs in payload.resource_spans:
            self.resources.append(_attrs(rs.resource.attributes))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        {
                            "name": s.name,
                            "kind": PbSpan.SpanKind.Name(s.kind),
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "attrs": _attrs(s.attributes),
                            "events": [(e.name, _attrs(e.attributes)) for e in s.events],
                            "status": s.status.code,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def trace(self, proxy: Any, trace_id: str, count: int) -> list[dict[str, Any]]:
        """The `count` spans of one trace, once exported (flushed off the event loop: the
        exporter posts to this receiver, which runs on it)."""
        assert proxy.state.tracing is not None
        for _ in range(100):
            await asyncio.to_thread(proxy.state.tracing.provider.force_flush, 5000)
            found = [s for s in self.spans if s["trace_id"] == trace_id]
            if len(found) >= count:
                assert len(found) == count, [s["name"] for s in found]
                return sorted(found, key=lambda s: s["start"])
            await asyncio.sleep(0.02)
        raise AssertionError(f"{len(found)} spans of trace {trace_id}, expected {count}")


@pytest.fixture
async def receiver(aiohttp_server: Any, monkeypatch: Any) -> Spans:
    spans = Spans()
    app = web.Application()
    app.router.add_post("/v1/traces", spans.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    # The two variables the README says are enough.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", str(server.make_url("/v1/traces")))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    return spans


def _tp(header: str) -> tuple[str, str]:
    """(trace id, parent span id) of a traceparent header."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00" and flags == "01"
    return trace_id, span_id


def _check_reprompted_trace(
    spans: list[dict[str, Any]], upstream: Any, path: str, streamed: bool
) -> dict[str, Any]:
    """A request whose only call was blocked and reprompted: a SERVER span continuing the
    client's, two CLIENT round spans under it (the second a reprompt), each the parent the
    upstream was told; the decision an event on the server span. Returns the server span."""
    server, first, second = spans
    assert server["kind"] == "SPAN_KIND_SERVER"
    assert server["name"] == f"POST {path}"
    assert (server["trace_id"], server["parent"]) == (CLIENT_TRACE, CLIENT_SPAN)
    attrs = server["attrs"]
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.route"] == path
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-test"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["callgate.principal"] == "agent-7"
    assert attrs["callgate.upstream_rounds"] == 2
    assert attrs["callgate.tool_calls.blocked"] == 1
    assert attrs["callgate.tool_calls.allowed"] == 0
    for n, span in enumerate((first, second)):
        assert span["kind"] == "SPAN_KIND_CLIENT"
        assert span["parent"] == server["span_id"]
        assert span["name"] == "chat gpt-test"
        assert span["attrs"]["callgate.round"] == n
        assert span["attrs"]["callgate.reprompt"] is (n == 1)
        assert span["attrs"]["gen_ai.request.model"] == "gpt-test"
        assert span["attrs"]["http.response.status_code"] == 200
        assert span["attrs"]["server.address"] == "127.0.0.1"
        assert server["start"] <= span["start"] <= span["end"] <= server["end"]
    assert first["end"] <= second["start"]  # rounds follow each other
    # The upstream's parent is the round span, never the client's span.
    sent = [_tp(r.headers["traceparent"]) for r in upstream.received if r.path == "/v1" + path[3:]]
    assert sent == [(CLIENT_TRACE, first["span_id"]), (CLIENT_TRACE, second["span_id"])]
    [(name, event)] = server["events"]
    assert name == "callgate.tool_call.decision"
    assert event["gen_ai.tool.name"] == "delete_file"
    assert event["gen_ai.tool.call.id"] == "c1"
    assert event["callgate.decision"] == "blocked"
    assert event["callgate.gate"] == "rules"
    assert event["callgate.reason"]
    assert event["callgate.message"].startswith("Policy violation")
    assert event["callgate.action"] == "reprompt"
    assert event["callgate.principal"] == "agent-7"
    assert "gen_ai.tool.call.arguments" not in event  # only with telemetry.record_arguments
    if not streamed:  # token usage of whole answers (stream events are not parsed for it)
        for span in (first, second):
            assert span["attrs"]["gen_ai.usage.input_tokens"] > 0
        total = sum(s["attrs"]["gen_ai.usage.input_tokens"] for s in (first, second))
        assert attrs["gen_ai.usage.input_tokens"] == total
    return server


@pytest.mark.parametrize("streamed", [False, True])
async def test_chat_reprompt_round_and_blocked_call(
    make_proxy: Any, upstream: Any, receiver: Spans, streamed: bool
) -> None:
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    client = proxy.client(
        default_headers={"traceparent": TRACEPARENT, "x-callgate-principal": "agent-7"}
    )
    call = ("delete_file", {"path": "/etc/passwd", "password": "hunter2"})
    if streamed:
        upstream.push(SSE(chat_stream(call, ids=["c1"])), SSE(chat_stream(text="I won't.")))
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.strip() == "I won't."
    else:
        upstream.push(completion(call, ids=["c1"]), completion(content="I won't."))
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}], tools=CHAT_TOOLS
        )
        assert reply.choices[0].message.content == "I won't."
    spans = await receiver.trace(proxy, CLIENT_TRACE, 3)
    _check_reprompted_trace(spans, upstream, "/v1/chat/completions", streamed)
    # The audit record leads to the trace.
    [record] = seen
    assert record["trace_id"] == CLIENT_TRACE and record["decision"] == "blocked"
    assert receiver.resources[0]["service.name"] == "callgate"


@pytest.mark.parametrize("streamed", [False, True])
async def test_responses_reprompt_round_and_blocked_call(
    make_proxy: Any, upstream: Any, receiver: Spans, streamed: bool
) -> None:
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    api = FakeResponses()
    upstream.push(
        api.reply(response(fc("delete_file", {"path": "/"}, "c1"))),
        api.reply(response(msg("I won't."), usage={**USAGE, "total_tokens": 20})),
    )
    client = proxy.client(
        default_headers={"traceparent": TRACEPARENT, "x-callgate-principal": "agent-7"}
    )
    if streamed:
        async with client.responses.stream(model="gpt-test", input="x", tools=TOOLS) as stream:
            _ = [e async for e in stream]
            final = await stream.get_final_response()
    else:
        final = await client.responses.create(model="gpt-test", input="x", tools=TOOLS)
    assert final.output_text == "I won't."
    spans = await receiver.trace(proxy, CLIENT_TRACE, 3)
    _check_reprompted_trace(spans, upstream, "/v1/responses", streamed)
    assert [r["trace_id"] for r in seen] == [CLIENT_TRACE]


async def test_allowed_call_new_trace_log_line_and_arguments(
    make_proxy: Any, upstream: Any, receiver: Spans, tmp_path: Path
) -> None:
    """Without a client traceparent a trace starts at callgate; `record_arguments` puts the
    (redacted) arguments on the event; the request log line and the audit file carry the trace
    id (and the file's chain holds with it)."""
    from structlog.testing import capture_logs

    audit = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        {
            **POLICY,
            "audit": {"redact": ["password"], "file": str(audit)},
            "telemetry": {"record_arguments": True},
        }
    )
    upstream.push(completion(("get_weather", {"city": "Oslo", "password": "hunter2"}), ids=["c9"]))
    with capture_logs() as logs:
        await proxy.client().chat.completions.create(model="gpt-test", messages=[])
    [line] = [e for e in logs if e["event"] == "request"]
    trace_id = line["trace_id"]
    [server, rnd] = await receiver.trace(proxy, trace_id, 2)
    assert server["parent"] == "" and rnd["parent"] == server["span_id"]
    [(_, event)] = server["events"]
    assert event["callgate.decision"] == "allowed"
    assert "callgate.gate" not in event
    assert event["gen_ai.tool.call.arguments"] == '{"city":"Oslo","password":"[REDACTED]"}'
    assert rnd["attrs"]["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert rnd["attrs"]["gen_ai.response.id"] == "chatcmpl-test"
    assert rnd["attrs"]["gen_ai.usage.input_tokens"] == 10
    assert rnd["attrs"]["gen_ai.usage.output_tokens"] == 5
    [decision] = [e for e in logs if e["event"] == "tool_call_decision"]
    assert decision["trace_id"] == trace_id
    assert "hunter2" not in repr(receiver.spans)
    await proxy.server.close()  # flushes and closes the audit file
    [written] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert written["trace_id"] == trace_id and written["call_id"] == "c9"
    result = verify_chain(str(audit))
    assert result.problem is None and result.records == 1


async def test_passthrough_and_upstream_failure(
    make_proxy: Any, upstream: Any, receiver: Spans
) -> None:
    proxy = await make_proxy(POLICY)
    upstream.push({"object": "list", "data": []})
    headers = {"traceparent": TRACEPARENT}
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/models", headers=headers) as resp:
            assert resp.status == 200
    [server] = await receiver.trace(proxy, CLIENT_TRACE, 1)
    assert server["name"] == "GET /v1/{tail}"
    # A pass-through request has no round span: the upstream's parent is the server span.
    assert _tp(upstream.received[-1].headers["traceparent"]) == (CLIENT_TRACE, server["span_id"])

    # The upstream down: the round span says why, the server span carries the 502.
    other = "0af7651916cd43dd8448eb211c80319c"
    down = await make_proxy(POLICY, upstream_url="http://127.0.0.1:9/v1")
    client = down.client(default_headers={"traceparent": f"00-{other}-b7ad6b7169203331-01"})
    with pytest.raises(Exception, match=r"502|unreachable"):
        await client.chat.completions.create(model="gpt-test", messages=[])
    server, rnd = await receiver.trace(down, other, 2)
    assert rnd["attrs"]["error.type"] == "upstream_unreachable" and rnd["status"] == 2
    assert server["attrs"]["http.response.status_code"] == 502 and server["status"] == 2


async def test_off_by_default_the_client_context_passes_through(
    make_proxy: Any, upstream: Any, monkeypatch: Any
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    proxy = await make_proxy(POLICY)
    seen = records(proxy)
    assert proxy.state.tracing is None
    upstream.push(completion(("delete_file", {}), ids=["c1"]), completion(content="no"))
    client = proxy.client(default_headers={"traceparent": TRACEPARENT})
    await client.chat.completions.create(model="gpt-test", messages=[])
    assert [r.headers["traceparent"] for r in upstream.received] == [TRACEPARENT] * 2
    assert "trace_id" not in seen[0]


def test_off_imports_nothing_of_opentelemetry() -> None:
    """Off, serving a request loads no OpenTelemetry module (its cost is not paid)."""
    code = """
import asyncio, sys
from aiohttp.test_utils import TestClient, TestServer
from proxy.app import create_app
from proxy.policy import load_policy_text

async def main():
    app = create_app(load_policy_text("upstream: {base_url: 'http://127.0.0.1:9/v1'}", "<t>"))
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                                 headers={"traceparent": TRACEPARENT})
        assert resp.status == 502, resp.status
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    assert not loaded, loaded
    print("ok")

asyncio.run(main())
""".replace("TRACEPARENT", repr(TRACEPARENT))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CALLGATE_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert proc.stdout.decode().splitlines()[-1:] == ["ok"], proc.stderr.decode()[-2000:]


@pytest.mark.parametrize(
    ("traces", "env", "expected"),
    [
        (None, {}, []),  # off by default
        (None, {"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        (None, {"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        (None, {"OTEL_TRACES_EXPORTER": "none"}, []),
        (True, {}, ["otlp"]),
        (True, {"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, []),
        (True, {"OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_when_tracing_is_on(traces: bool | None, env: dict[str, str], expected: list[str]) -> None:
    assert exporters(TelemetryConfig(traces=traces), env) == expected


def test_unknown_exporter_is_refused() -> None:
    with pytest.raises(TelemetryError, match="zipkin"):
        exporters(TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "zipkin"})


def test_attribute_helpers_decode_what_the_exporter_sends() -> None:
    kv = KeyValue(key="k", value=AnyValue(int_value=3))
    assert _attrs([kv]) == {"k": 3}
