"""Audit before delivery: no answer reaches the client before the records of its calls are in
the audit file (written to the OS, so they survive a killed process; see `audit.fsync`).

Records are made on the event loop and written by the auditor's thread in shared batches; a
route or stream asks `Auditor.unwritten(ctx)` (an integer comparison) before each write to
the client and waits only when this request has a record still in flight.
"""

from __future__ import annotations

import structlog
from aiohttp import web

from proxy.audit import AuditUnavailable
from proxy.errors import error_response
from proxy.forward import StreamFailed
from proxy.state import AppState
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.audit")
UNAVAILABLE = "audit_unavailable"
MESSAGE = (
    "callgate could not write the audit record of this answer's tool calls, so it was not "
    "delivered; retry later"
)


async def deliver(
    state: AppState, ctx: CallContext, response: web.StreamResponse
) -> web.StreamResponse:
    """A non-streaming answer, once this request's records are written; else a 503."""
    if not state.auditor.unwritten(ctx):
        return response
    try:
        await state.auditor.written(ctx)
    except AuditUnavailable as exc:
        log.error("answer_withheld", reason=UNAVAILABLE, error=str(exc))
        return error_response(503, MESSAGE, "server_error", UNAVAILABLE)
    return response


# With other streams being served, a stream waits up to this long for their records to share
# its audit write: streams reach their calls at different moments, and a write each cost more
# CPU than the stream's own gating (a profile under load). A lone stream writes at once. The
# call reaches the client at most this much later.
STREAM_WINDOW = 0.001


async def on_record(state: AppState, ctx: CallContext) -> None:
    """Wait until this request's records are written; a stream that cannot, fails closed."""
    try:
        await state.auditor.written(ctx, STREAM_WINDOW if state.streams > 1 else 0.0)
    except AuditUnavailable as exc:
        log.error("answer_withheld", reason=UNAVAILABLE, error=str(exc))
        raise StreamFailed(MESSAGE, UNAVAILABLE) from None
