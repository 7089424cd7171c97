"""Calling the upstream on a client's behalf, for the gated routes of both APIs: timed (for
/metrics), failures in OpenAI's error shape, and each request sent to the upstream its policy
names (a reload does not redirect requests already in flight)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import orjson
import structlog
from aiohttp import web

from proxy import http1
from proxy.config import UpstreamConfig
from proxy.errors import bad_gateway, error_body, error_response
from proxy.metrics import add_upstream_time
from proxy.state import AppState
from proxy.stream_response import EventStream
from proxy.telemetry import request_trace
from proxy.toolcalls import CallContext
from proxy.transport import relay, upstream_path
from proxy.upstream import UpstreamError, UpstreamReply, response_headers

log = structlog.get_logger("callgate.streaming")


class StreamFailed(Exception):
    """The upstream stream cannot go on: held calls fail closed, the client gets an error event."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def event_object(payload: bytes) -> dict[str, Any]:
    """A stream event's decoded JSON object; anything else fails the stream closed."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise StreamFailed(
            f"upstream sent a malformed stream event: {exc}", "upstream_malformed"
        ) from None
    if not isinstance(obj, dict):
        raise StreamFailed(
            "upstream sent a stream event that is not a JSON object", "upstream_malformed"
        )
    return obj


async def next_chunk(resp: http1.Response) -> bytes | None:
    """The upstream stream's next bytes as they arrive (None at its end), read failures turned
    into StreamFailed.

    Only reading is guarded here: a failed write to the client (aiohttp's reset error is also a
    ClientConnectionError) happens in the caller and passes through as the client's failure.
    A plain awaitable rather than an async generator: a generator's set-up and finalization
    cost more than the read itself on a stream of small events.
    """
    try:
        return await resp.next_chunk()
    except http1.BoundExceeded as exc:  # before ClientPayloadError, which it is
        raise StreamFailed(str(exc), "upstream_too_large") from None
    except http1.DeadlinePassed as exc:  # logged by the gate's fail() with its message
        raise StreamFailed(str(exc), "upstream_timeout") from None
    except TimeoutError:  # aiohttp's ServerTimeoutError too
        raise StreamFailed("upstream stream timed out", "upstream_timeout") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise StreamFailed(
            f"upstream disconnected mid-stream: {exc}", "upstream_disconnected"
        ) from None


class StreamGate(Protocol):
    async def run(self, resp: http1.Response) -> None: ...


def is_event_stream(resp: http1.Response) -> bool:
    return "event-stream" in resp.headers.get("Content-Type", "")


async def fetch(
    state: AppState,
    request: web.Request,
    method: str,
    path_qs: str,
    payload: bytes | None,
    target: UpstreamConfig,
) -> UpstreamReply:
    """Send and read the whole answer; raises UpstreamError when the upstream cannot be had
    (proxy.transport.upstream_failure words it for the client)."""
    if state.tracing is not None:
        return await _traced_fetch(state, request, method, path_qs, payload, target)
    started = time.perf_counter()
    try:
        return await state.upstream.fetch(method, path_qs, request.headers, payload, target=target)
    finally:
        add_upstream_time(time.perf_counter() - started)


async def _traced_fetch(
    state: AppState,
    request: web.Request,
    method: str,
    path_qs: str,
    payload: bytes | None,
    target: UpstreamConfig,
) -> UpstreamReply:
    """fetch() in a round span, its context sent upstream."""
    assert state.tracing is not None
    rnd = state.tracing.start_round(
        request_trace(request),
        request.headers,
        method,
        path_qs,
        streamed=False,
        origin=state.upstream.target(target).origin,
    )
    started = time.perf_counter()
    try:
        reply = await state.upstream.fetch(method, path_qs, rnd.headers, payload, target=target)
    except UpstreamError as exc:
        rnd.failed(exc.code, exc.status)
        raise
    except BaseException:
        rnd.failed("cancelled")
        raise
    finally:
        add_upstream_time(time.perf_counter() - started)
    rnd.answered(reply.status, reply.body)
    return reply


async def _open(
    state: AppState, request: web.Request, path_qs: str, payload: bytes, target: UpstreamConfig
) -> http1.Response:
    """Open a streamed round (in a round span when tracing: its context sent upstream)."""
    if state.tracing is None:
        return await state.upstream.open("POST", path_qs, request.headers, payload, target=target)
    rnd = state.tracing.start_round(
        request_trace(request),
        request.headers,
        "POST",
        path_qs,
        streamed=True,
        origin=state.upstream.target(target).origin,
    )
    try:
        resp = await state.upstream.open("POST", path_qs, rnd.headers, payload, target=target)
    except UpstreamError as exc:
        rnd.failed(exc.code, exc.status)
        raise
    except BaseException:
        rnd.failed("cancelled")
        raise
    rnd.answered(resp.status)
    return resp


async def serve_stream(
    request: web.Request,
    state: AppState,
    ctx: CallContext,
    payload: bytes,
    target: UpstreamConfig,
    make_gate: Callable[[web.StreamResponse], StreamGate],
) -> web.StreamResponse:
    """Forward a `stream: true` request and run the gate over the upstream's events."""
    started = time.perf_counter()
    try:
        resp = await _open(state, request, upstream_path(request), payload, target)
    except UpstreamError as exc:
        return error_response(exc.status, str(exc), "upstream_error", exc.code)
    finally:
        add_upstream_time(time.perf_counter() - started)
    if resp.status != 200:
        return await relay(request, resp, decoded=True)  # upstream errors pass unchanged
    if not is_event_stream(resp):
        # A 200 that is not an event stream cannot be gated on the fly; relaying it would let
        # its tool calls through ungated, so it fails closed.
        content_type = resp.headers.get("Content-Type", "none")
        resp.close()
        log.error("upstream_not_a_stream", content_type=content_type)
        return bad_gateway(
            f"The upstream answered a streaming request with Content-Type {content_type!r} "
            "instead of text/event-stream.",
            "upstream_malformed",
        )
    out = EventStream(status=200)
    out.headers.extend(response_headers(resp.headers, decoded=True))
    out.headers["x-callgate-request-id"] = ctx.request_id
    try:
        await out.prepare(request)
        await make_gate(out).run(resp)  # which ends the response
    except ConnectionError:
        log.info("client_disconnected", stream=True)  # the gate closed the upstream response
    except Exception:
        # Headers are sent: a 500 is impossible, so end the stream with an error event.
        log.exception("stream_internal_error")
        body = error_body(
            f"callgate internal error; see its log for request {ctx.request_id}",
            "server_error",
            "internal_error",
        )
        with contextlib.suppress(Exception):
            await out.write(b"data: " + body + b"\n\n")
    finally:
        resp.close()
    return out


async def open_round(
    state: AppState, request: web.Request, body: dict[str, Any], target: UpstreamConfig
) -> tuple[http1.Response | None, str, str, int | None]:
    """Open the next round of a stream: (response, "", "", 200) or (None, message, code, the
    upstream's HTTP status when it answered with one)."""
    started = time.perf_counter()
    try:
        resp = await _open(state, request, upstream_path(request), orjson.dumps(body), target)
    except UpstreamError as exc:
        return None, str(exc), exc.code, None
    finally:
        add_upstream_time(time.perf_counter() - started)
    if resp.status == 200 and is_event_stream(resp):
        return resp, "", "", 200
    try:
        detail = (await resp.read())[:500].decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = f"(body unreadable: {exc})"
    finally:
        resp.release()
    if resp.status == 200:
        message = "upstream answered the reprompt without an event stream"
        return None, message, "upstream_malformed", None
    return (
        None,
        f"upstream answered the reprompt with HTTP {resp.status}: {detail}",
        "upstream_error",
        resp.status,
    )


def raw_reply(reply: UpstreamReply) -> web.Response:
    """The upstream's answer as it came (decoded), with its headers."""
    return web.Response(
        status=reply.status, headers=response_headers(reply.headers, decoded=True), body=reply.body
    )


def json_reply(reply: UpstreamReply, data: Any) -> web.Response:
    """A rewritten answer: the upstream's status and headers around callgate's JSON."""
    headers = response_headers(reply.headers, decoded=True)
    headers.popall("Content-Type", None)
    return web.Response(
        status=reply.status,
        headers=headers,
        body=orjson.dumps(data),
        content_type="application/json",
    )


def parse_reply(reply: UpstreamReply) -> dict[str, Any] | web.Response:
    """The upstream's JSON object, or a 502 saying why it is not one."""
    try:
        data = orjson.loads(reply.body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        log.error("upstream_malformed_json", error=str(exc), bytes=len(reply.body))
        return bad_gateway(
            f"The upstream returned a malformed JSON body: {exc}", "upstream_malformed"
        )
    return data
