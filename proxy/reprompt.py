"""A reprompt round never makes the answer worse (both APIs, streaming and not).

The blocked calls of a reprompted round are recorded once the round they asked for is
answered: as `reprompt` when the upstream took it, as `reprompt_failed` (with the upstream's
status) when it refused or failed it. In the second case the client gets what `strip` would
have given for the reprompted round: the surviving answer, the blocked calls removed, a notice,
HTTP 200 (never a 5xx, which SDKs retry: a retried request takes its rate-limit slots again).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from proxy.chat import never_allowed
from proxy.gates.decision import Decision
from proxy.policy import Policy
from proxy.state import AppState
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.reprompt")

# StreamFailed / UpstreamError codes -> the `status` a failed round is labelled with (an HTTP
# status when the upstream answered with one).
_LABELS = {
    "upstream_timeout": "timeout",
    "upstream_unreachable": "unreachable",
    "upstream_disconnected": "unreachable",
    "upstream_error": "error_event",  # an error event inside a 200 stream
    "upstream_failed": "error_event",  # `response.failed`
}


def label(code: str) -> str:
    """The status label of a round that failed without an HTTP error status."""
    return _LABELS.get(code, "malformed")


def asked(state: AppState, ctx: CallContext, blocked: list[Decision]) -> None:
    """The reprompt round was answered: the blocked calls' records (once each)."""
    for d in blocked:
        state.auditor.record(d, ctx, "blocked", "reprompt")


def failed(
    state: AppState, ctx: CallContext, route: str, blocked: list[Decision], status: str
) -> None:
    """The reprompt round failed upstream: record it, count it, say so in the log."""
    for d in blocked:
        state.auditor.record(d, ctx, "blocked", "reprompt_failed", upstream_status=status)
    state.metrics.reprompt_failures.labels(route, status).inc()
    log.warning("reprompt_failed", route=route, status=status, blocked=len(blocked))


def denied(policy: Policy) -> Callable[[str], bool]:
    """Whether the policy never lets the model call a tool (for a reprompt's `tool_choice`)."""
    return lambda name: never_allowed(policy.for_tool(name))
