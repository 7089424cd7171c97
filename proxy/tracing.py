"""OpenTelemetry traces, imported only when tracing is on (proxy.telemetry decides).

One trace per client request, continuing the client's W3C `traceparent`:

- a SERVER span for the request (HTTP and GenAI attributes, the principal, token usage summed
  over rounds, how many calls were allowed and blocked);
- a CLIENT span per upstream round (the first request, and each reprompt round), whose
  context is what the upstream receives as `traceparent`;
- an event on the server span per tool-call decision (`callgate.tool_call.decision`: tool,
  call id, decision, gate, reason, principal; the arguments only with
  `telemetry.record_arguments`, after the audit's redaction).

Attribute names follow the OpenTelemetry GenAI semantic conventions where they name one.
The provider is the app's own (not the global one): tests and embedders can run several apps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, StatusCode, set_span_in_context

from proxy import http1
from proxy.config import TelemetryConfig
from proxy.routes.incoming import request_id
from proxy.telemetry import TRACE
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.tracing")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EVENT = "callgate.tool_call.decision"
# Argument text longer than this is cut on the event (span attributes are not a data store).
MAX_ARGUMENT_CHARS = 4096
_OPERATION = {"chat.completions": "chat", "responses": "chat"}
_PROPAGATED = ("traceparent", "tracestate")

# The request being served on this task: the audit listener finds its span here.
_current: ContextVar[RequestTrace | None] = ContextVar("callgate_request_trace", default=None)


def _version() -> str:
    try:
        return version("callgate")
    except PackageNotFoundError:
        return "unknown"


class RequestTrace:
    """One request's spans and what they sum up."""

    __slots__ = (
        "allowed",
        "blocked",
        "input_tokens",
        "model",
        "operation",
        "output_tokens",
        "round_span",
        "rounds",
        "span",
        "trace_id",
    )

    def __init__(self, span: Span) -> None:
        self.span = span
        self.trace_id = format(span.get_span_context().trace_id, "032x")
        self.rounds = 0
        self.round_span: Span | None = None  # a streamed round's span, open while it streams
        self.operation: str | None = None
        self.model: str | None = None
        self.allowed = 0
        self.blocked = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def bind(self, ctx: CallContext) -> None:
        """A gated request's context is known: its trace id goes on its audit records."""
        ctx.trace_id = self.trace_id
        self.operation = _OPERATION.get(ctx.route, ctx.route)
        self.model = ctx.model
        # One call: the SDK takes a lock and validates per call (about 2 us a time here).
        attributes = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": "openai",
            "callgate.principal": ctx.principal,
            "callgate.route": ctx.route,
        }
        if ctx.model:
            attributes["gen_ai.request.model"] = ctx.model
        self.span.set_attributes(attributes)

    def end_round(self) -> None:
        if self.round_span is not None:
            self.round_span.end()
            self.round_span = None


class Round:
    """One upstream request's CLIENT span and the headers that carry its context upstream."""

    __slots__ = ("headers", "span", "streamed", "trace")

    def __init__(
        self, trace: RequestTrace | None, span: Span, headers: CIMultiDict[str], streamed: bool
    ) -> None:
        self.trace = trace
        self.span = span
        self.headers = headers
        self.streamed = streamed

    def answered(self, status: int, body: bytes | None = None) -> None:
        """The upstream answered: a whole body ends the span; a stream's span stays open until
        the stream is done with (the next round, or the request's end)."""
        span = self.span
        attributes: dict[str, Any] = {"http.response.status_code": status}
        if status >= 400:
            span.set_status(StatusCode.ERROR)
            attributes["error.type"] = str(status)
        elif body is not None:
            self._reply_attributes(body, attributes)
        span.set_attributes(attributes)
        if self.streamed and self.trace is not None and status < 400:
            self.trace.round_span = span
        else:
            span.end()

    def failed(self, code: str, status: int | None = None) -> None:
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("error.type", code)
        span.set_status(StatusCode.ERROR, code)
        span.end()

    def _reply_attributes(self, body: bytes, attributes: dict[str, Any]) -> None:
        """GenAI response attributes and token usage of a whole JSON answer."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(data, dict):
            return
        if isinstance(data.get("id"), str):
            attributes["gen_ai.response.id"] = data["id"]
        if isinstance(data.get("model"), str):
            attributes["gen_ai.response.model"] = data["model"]
        choices = data.get("choices")
        if isinstance(choices, list):
            reasons = [
                c["finish_reason"]
                for c in choices
                if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
            ]
            if reasons:
                attributes["gen_ai.response.finish_reasons"] = reasons
        elif isinstance(data.get("status"), str):  # Responses API
            attributes["gen_ai.response.finish_reasons"] = [data["status"]]
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return
        # Chat Completions names them prompt/completion; Responses, input/output.
        inp = usage.get("input_tokens", usage.get("prompt_tokens"))
        out = usage.get("output_tokens", usage.get("completion_tokens"))
        if isinstance(inp, int):
            attributes["gen_ai.usage.input_tokens"] = inp
            if self.trace is not None:
                self.trace.input_tokens += inp
        if isinstance(out, int):
            attributes["gen_ai.usage.output_tokens"] = out
            if self.trace is not None:
                self.trace.output_tokens += out


def _exporter(name: str, config: TelemetryConfig) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Unset arguments fall back to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT...
    return OTLPSpanExporter(endpoint=config.endpoint)


class Tracing:
    def __init__(
        self,
        config: TelemetryConfig,
        exporters: list[str],
        processors: list[SpanProcessor] | None = None,
    ) -> None:
        import os

        self.config = config
        attributes: dict[str, Any] = {"service.version": _version()}
        if config.service_name:
            attributes["service.name"] = config.service_name
        elif not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "callgate"
        sampler = (
            ParentBased(TraceIdRatioBased(config.sample_ratio))
            if config.sample_ratio is not None
            else None  # the SDK reads OTEL_TRACES_SAMPLER (default: parent-based, always on)
        )
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        for name in exporters:
            # Batched on the SDK's own thread (OTEL_BSP_* tune it): export never blocks the loop.
            self.provider.add_span_processor(BatchSpanProcessor(_exporter(name, config)))
        for processor in processors or ():
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("callgate", _version())
        self.record_arguments = config.record_arguments
        log.info("tracing", exporters=exporters, endpoint=config.endpoint)

    async def close(self) -> None:
        # Flushes what is queued (a blocking export): off the event loop.
        await asyncio.to_thread(self.provider.shutdown)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The request's SERVER span, continuing the client's trace context."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        span = self.tracer.start_span(
            f"{request.method} {route}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": route,
                "url.path": request.path,
                "callgate.request_id": request_id(request),
            },
        )
        trace = request[TRACE] = RequestTrace(span)
        token = _current.set(trace)
        status = 499  # cancelled: the client left
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            _current.reset(token)
            trace.end_round()
            attributes: dict[str, Any] = {"http.response.status_code": status}
            if status >= 500 or status == 499:
                span.set_status(StatusCode.ERROR)
                attributes["error.type"] = str(status)
            if trace.allowed or trace.blocked:
                attributes["callgate.tool_calls.allowed"] = trace.allowed
                attributes["callgate.tool_calls.blocked"] = trace.blocked
            if trace.rounds:
                attributes["callgate.upstream_rounds"] = trace.rounds
            if trace.input_tokens or trace.output_tokens:
                attributes["gen_ai.usage.input_tokens"] = trace.input_tokens
                attributes["gen_ai.usage.output_tokens"] = trace.output_tokens
            span.set_attributes(attributes)
            span.end()

    def start_round(
        self,
        trace: RequestTrace | None,
        headers: Mapping[str, str],
        method: str,
        path_qs: str,
        *,
        streamed: bool,
        origin: http1.Origin | None = None,
    ) -> Round:
        """A CLIENT span for one upstream request, and the client's headers with its context
        in place of the client's own."""
        attributes: dict[str, Any] = {"http.request.method": method}
        if origin is not None:
            attributes["server.address"] = origin.host
            attributes["server.port"] = origin.port
        if trace is not None:
            trace.end_round()  # the stream before this round is done with
            attributes["callgate.round"] = trace.rounds
            attributes["callgate.reprompt"] = trace.rounds > 0
            trace.rounds += 1
            parent = set_span_in_context(trace.span)
        else:
            parent = None
        operation = trace.operation if trace is not None else None
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
            attributes["gen_ai.provider.name"] = "openai"
            if trace is not None and trace.model:
                attributes["gen_ai.request.model"] = trace.model
            name = f"{operation} {trace.model}" if trace is not None and trace.model else operation
        else:
            name = f"{method} {path_qs.split('?', 1)[0]}"
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        out: CIMultiDict[str] = CIMultiDict(headers)
        for key in _PROPAGATED:
            out.popall(key, None)
        propagate.inject(out, context=set_span_in_context(span))
        return Round(trace, span, out, streamed)

    def propagated(self, request: web.Request) -> CIMultiDict[str]:
        """The client's headers with this request's span as the upstream's parent (the
        pass-through routes, which have no round span)."""
        trace = request._state.get(TRACE)
        out: CIMultiDict[str] = CIMultiDict(request.headers)
        if trace is not None:
            for key in _PROPAGATED:
                out.popall(key, None)
            propagate.inject(out, context=set_span_in_context(trace.span))
        return out

    def on_audit(self, record: dict[str, Any]) -> None:
        """Audit listener: one event per tool-call decision on the request's span."""
        trace = _current.get()
        if trace is None:
            return
        attributes: dict[str, Any] = {
            "gen_ai.tool.name": record["tool"],
            "gen_ai.tool.call.id": record["call_id"],
            "callgate.decision": record["decision"],
            "callgate.principal": record["principal"],
            "callgate.policy": record["policy"],
            "callgate.latency_ms": record["latency_ms"],
        }
        for key in ("gate", "reason", "message", "action", "upstream_status"):
            value = record.get(key)
            if value is not None:
                attributes["callgate." + key] = value
        if record["shadow"]:
            attributes["callgate.shadow_gates"] = [s["gate"] for s in record["shadow"]]
        if record["fail_open"]:
            attributes["callgate.fail_open_gates"] = list(record["fail_open"])
        if self.record_arguments:
            args = record["arguments"]
            text = args if isinstance(args, str) else orjson.dumps(args, default=str).decode()
            if len(text) > MAX_ARGUMENT_CHARS:
                text = text[:MAX_ARGUMENT_CHARS] + "…"
            attributes["gen_ai.tool.call.arguments"] = text
        trace.span.add_event(EVENT, attributes)
        decision = record["decision"]
        if decision == "allowed":
            trace.allowed += 1
        elif decision == "blocked":
            trace.blocked += 1
