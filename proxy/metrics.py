"""Prometheus metrics, one registry per app (so tests and embedders never share counters).

Decisions are counted from audit records, so a metric and an audit line can never disagree.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

# Seconds spent waiting on the upstream during the current request (headers + body reads).
upstream_time: ContextVar[list[float] | None] = ContextVar("callgate_upstream_time", default=None)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def add_upstream_time(seconds: float) -> None:
    acc = upstream_time.get()
    if acc is not None:
        acc[0] += seconds


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # labels() takes a lock and builds a key on every call: children are looked up once.
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}
        self._decision_children: dict[tuple[str, str, str], Any] = {}
        r = self.registry
        self.requests = Counter(
            "callgate_requests", "HTTP requests served", ["route", "status"], registry=r
        )
        self.decisions = Counter(
            "callgate_tool_call_decisions",
            "Tool-call decisions by tool, deciding gate and outcome",
            ["tool", "gate", "outcome"],
            registry=r,
        )
        self.shadow_blocks = Counter(
            "callgate_shadow_blocks",
            "Blocks a shadow-mode gate would have made",
            ["tool", "gate"],
            registry=r,
        )
        self.store_errors = Counter(
            "callgate_store_errors",
            "Decisions affected by a store failure",
            ["gate", "handling"],
            registry=r,
        )
        self.reprompts = Counter(
            "callgate_reprompt_rounds",
            "Reprompt rounds asked of the upstream",
            ["route"],
            registry=r,
        )
        self.reloads = Counter(
            "callgate_policy_reloads", "Policy reload attempts", ["result"], registry=r
        )
        self.upstream_latency = Histogram(
            "callgate_upstream_latency_seconds",
            "Time waiting on the upstream per request (to headers, plus body for non-streams)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "callgate_proxy_overhead_seconds",
            "Time callgate added to a non-streaming request (total minus upstream)",
            ["route"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )

    def observe_request(
        self, route: str, status: int, total: float, upstream: float, *, streamed: bool
    ) -> None:
        """Record one request; callgate's own share is total minus the upstream wait."""
        children = self._children.get((route, status))
        if children is None:
            children = self._children[(route, status)] = (
                self.requests.labels(route, str(status)),
                self.upstream_latency.labels(route),
                self.overhead.labels(route),
            )
        requests, latency, overhead = children
        requests.inc()
        if upstream:
            latency.observe(upstream)
            # A stream's duration is the model's, not ours: overhead only for whole bodies.
            if status < 500 and not streamed:
                overhead.observe(max(0.0, total - upstream))

    def on_audit(self, record: dict[str, Any]) -> None:
        tool = record["tool"]
        key = (tool, record["gate"] or "none", record["decision"])
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()
        for shadow in record["shadow"]:
            self.shadow_blocks.labels(tool, shadow["gate"]).inc()
        if record["reason"] == "store_error":
            self.store_errors.labels(record["gate"], "fail_closed").inc()
        for gate in record["fail_open"]:
            self.store_errors.labels(gate, "fail_open").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_label(request: web.Request) -> str:
    path = request.path
    if path.startswith("/v1/chat/completions"):
        return "chat.completions"
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/"):
        return "passthrough"
    return path.strip("/") or "root"


async def metrics_handler(request: web.Request) -> web.Response:
    from proxy.state import STATE

    body = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
