"""The aiohttp application: routes, per-request context, and the services' lifecycle."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.approvals import Approvals, Notifier
from proxy.audit import Auditor
from proxy.auth import Authenticator
from proxy.auth.middleware import auth_middleware
from proxy.errors import error_response
from proxy.logs import log_request
from proxy.metrics import route_label, upstream_time
from proxy.paths import PathRefused, check_target, override_problem
from proxy.policy import Policy
from proxy.routes import admin, responses
from proxy.routes.chat import chat_completions
from proxy.routes.incoming import PRINCIPAL, request_id
from proxy.routes.passthrough import forward
from proxy.routes.probes import healthz, metrics_handler, readyz
from proxy.state import STATE, AppState
from proxy.store import Store, open_store
from proxy.store.memory import MemoryStore
from proxy.telemetry import request_trace, start_tracing
from proxy.transport import TARGET
from proxy.upstream import Upstream

log = structlog.get_logger("callgate.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_QUIET_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))


class RequestContext:
    """Per request: its id in every log line, errors in OpenAI's shape, one log line, metrics.

    A middleware object rather than a function with @web.middleware: the decorator sets an
    attribute on the function, which a compiled function (proxy.native) does not take.
    """

    __middleware_version__ = 1  # what @web.middleware marks: a new-style middleware

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        structlog.contextvars.clear_contextvars()
        trace = request_trace(request)  # None unless tracing is on
        if trace is None:
            structlog.contextvars.bind_contextvars(request_id=rid)
        else:
            structlog.contextvars.bind_contextvars(request_id=rid, trace_id=trace.trace_id)
        waited = [0.0]
        token = upstream_time.set(waited)
        started = time.perf_counter()
        response: web.StreamResponse | None = None
        try:
            response = await _answer(request, handler, rid)
            return response
        finally:
            upstream_time.reset(token)
            elapsed = time.perf_counter() - started
            status = response.status if response is not None else 499  # cancelled: client left
            request.app[STATE].metrics.observe_request(
                route_label(request),
                status,
                elapsed,
                waited[0],
                streamed=not isinstance(response, web.Response),
            )
            fields = {
                "method": request.method,
                "path": request.path,
                "status": status,
                "ms": round(elapsed * 1000, 3),
            }
            if trace is not None:
                fields["trace_id"] = trace.trace_id
            if request.path in _QUIET_PATHS:
                # Probes and scrapes arrive every few seconds: keep them out of the info log.
                log.debug("request", **fields)
            else:
                log_request(log, rid, request.get(PRINCIPAL), fields)


request_context = RequestContext()


def path_refused(request: web.Request) -> web.Response | None:
    """Route only canonical request targets (proxy.paths): any other spelling of a path could
    reach the upstream's gated endpoints through the verbatim pass-through. (Checked in
    `_answer`, before the auth middleware and the route, rather than as a middleware of its
    own: one coroutine less on every request and every resumption of it.)"""
    try:
        target = check_target(request.raw_path)
    except PathRefused as exc:
        return error_response(exc.status, exc.message, "invalid_request_error", "invalid_path")
    if request.rel_url.raw_path != target.path:
        # aiohttp routed on a path other than the one checked: never guess which one is meant.
        return error_response(
            400, "The request target is ambiguous.", "invalid_request_error", "invalid_path"
        )
    problem = override_problem(request.headers, target.query)
    if problem is not None:
        return error_response(400, problem, "invalid_request_error", "invalid_path")
    request[TARGET] = target
    return None


async def _answer(request: web.Request, handler: Handler, rid: str) -> web.StreamResponse:
    try:
        refused = path_refused(request)
        response = refused if refused is not None else await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(
            413, f"Request body too large: {exc.text}", "invalid_request_error", "request_too_large"
        )
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason, "invalid_request_error")
    except (web.RequestPayloadError, HttpProcessingError):
        # The body broke off mid-read (bad chunking, ...): the error's text quotes body bytes.
        return error_response(400, "Malformed request body", "invalid_request_error")
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return error_response(
            500,
            "callgate internal error; see its log for request " + rid,
            "server_error",
            "internal_error",
        )
    if not response.prepared:
        response.headers["x-callgate-request-id"] = rid
    return response


def create_app(
    policy: Policy,
    *,
    store: Store | None = None,
    clock: Callable[[], float] | None = None,
    config_path: str | None = None,
) -> web.Application:
    config = policy.config
    authenticator = None
    if config.auth is not None and config.auth.enabled:
        # Restart-only, like the store: the modes decide what the upstream may be sent.
        authenticator = Authenticator(config, config_path)
    tracing = start_tracing(config.telemetry)  # None (the default): nothing of OTel is loaded
    middlewares: list[Callable[..., Awaitable[web.StreamResponse]]] = [request_context]
    if tracing is not None:
        middlewares.insert(0, tracing.middleware)  # outermost: its span covers the log line
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=middlewares)
    state = AppState(
        policy=policy,
        store=store
        if store is not None
        else open_store(config.store, clock, stash_max_bytes=config.server.stash_max_bytes),
        auditor=Auditor(config.audit),
        upstream=Upstream(config.upstream),
        config_path=config_path,
        tracing=tracing,
    )
    app[STATE] = state
    approvals = Approvals(
        state.store,
        state.auditor,
        clock=clock,
        # The current policy's secret: a reload may rotate it.
        notifier=Notifier(lambda: state.policy.config.server.webhook_secret),
    )
    state.extra["approvals"] = approvals
    if authenticator is not None:
        state.extra["auth"] = authenticator
        app.middlewares.append(auth_middleware(authenticator, state.metrics.auth_failures))
        state.upstream.strip_client_credentials = True
    state.auditor.listeners.append(state.metrics.on_audit)
    if tracing is not None:
        state.auditor.listeners.append(tracing.on_audit)
    state.metrics.registry.register(state.upstream.bounds_exceeded)
    if isinstance(state.store, MemoryStore):
        state.store.on_evict = state.metrics.stash_evictions.inc
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/chat/completions", chat_completions)
    responses.add_routes(app.router)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    admin.setup(app, authenticator)

    async def start(_: web.Application) -> None:
        await state.upstream.start()
        await state.store.start()  # Redis: opens the pool and loads the scripts before serving
        await state.auditor.start()
        if not isinstance(state.store, MemoryStore):
            # Approvals the CLI answered against the shared store, for this chain to record.
            await approvals.start()
        if authenticator is not None:
            await authenticator.start()

    async def stop(_: web.Application) -> None:
        await approvals.close()
        await state.auditor.close()
        await state.upstream.close()
        await state.store.close()
        if authenticator is not None:
            await authenticator.close()
        if state.tracing is not None:
            await state.tracing.close()  # exports the spans still queued

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
