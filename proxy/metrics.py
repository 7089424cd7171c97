"""Prometheus metrics, one registry per app (so tests and embedders never share counters).

Decisions are counted from audit records, so a metric and an audit line can never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from bisect import bisect_left
from collections.abc import Iterator
from contextvars import ContextVar
from itertools import accumulate
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

# Seconds spent waiting on the upstream during the current request (headers + body reads).
upstream_time: ContextVar[list[float] | None] = ContextVar("callgate_upstream_time", default=None)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def add_upstream_time(seconds: float) -> None:
    acc = upstream_time.get()
    if acc is not None:
        acc[0] += seconds


class Counts:
    """A counter by labels, counted in a plain dict (requests, tool-call decisions).

    Counted on the event loop's thread for every request and call: prometheus_client's Counter
    takes a lock per increment, which the request path does not need; the counts become samples
    only when /metrics is scraped. Label values may be counted as any value whose str() is the
    label (a status code as its int: no conversion per request).
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts: dict[tuple[Any, ...], int] = {}

    def inc(self, *values: Any) -> None:
        self.counts[values] = self.counts.get(values, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        merged: dict[tuple[str, ...], int] = {}  # 200 and "200" are one label value
        for values, count in self.counts.items():
            labels = tuple(map(str, values))
            merged[labels] = merged.get(labels, 0) + count
        for labels, count in merged.items():
            family.add_metric(labels, count)
        yield family


class RouteHistogram:
    """A histogram by route, lock-free for the same reason as Counts: one bucket count per
    observation (bisect), cumulated when scraped."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets
        # (prometheus_client's utils carry no type hints.)
        self.edges = [floatToGoString(b) for b in buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        # route -> bucket counts (non-cumulative, the last is +Inf) followed by the sum: one
        # look-up per observation.
        self.routes: dict[str, list[float]] = {}

    def observe(self, route: str, value: float) -> None:
        counts = self.routes.get(route)
        if counts is None:
            counts = self.routes[route] = [0] * (len(self.bounds) + 1) + [0.0]
        counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound counts in it
        counts[-1] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["route"])
        for route, counts in self.routes.items():
            buckets = list(zip(self.edges, accumulate(counts[:-1]), strict=True))
            family.add_metric([route], buckets, counts[-1])
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counts("callgate_requests", "HTTP requests served", ("route", "status"))
        self.decisions = Counts(
            "callgate_tool_call_decisions",
            "Tool-call decisions by tool, deciding gate and outcome",
            ("tool", "gate", "outcome"),
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
        self.stash_evictions = Counter(
            "callgate_stash_evictions",
            "Stashed blocked calls the memory store evicted before their TTL (stash_max_bytes)",
            registry=r,
        )
        self.reprompt_failures = Counter(
            "callgate_reprompt_failures",
            "Reprompt rounds the upstream refused or failed (answered as strip), by upstream "
            "status: an HTTP status, timeout, unreachable, malformed or error_event",
            ["route", "status"],
            registry=r,
        )
        self.auth_failures = Counter(
            "callgate_auth_failures",
            "Requests refused 401 by authentication, by reason: missing, malformed, unknown, "
            "expired, revoked, invalid or untrusted_peer",
            ["reason"],
            registry=r,
        )
        self.reloads = Counter(
            "callgate_policy_reloads", "Policy reload attempts", ["result"], registry=r
        )
        self.upstream_latency = RouteHistogram(
            "callgate_upstream_latency_seconds",
            "Time waiting on the upstream per request (to headers, plus body for non-streams)",
            _LATENCY_BUCKETS,
        )
        self.overhead = RouteHistogram(
            "callgate_proxy_overhead_seconds",
            "Time callgate added to a non-streaming request (total minus upstream)",
            _OVERHEAD_BUCKETS,
        )
        for collector in (self.requests, self.decisions, self.upstream_latency, self.overhead):
            r.register(collector)
        # Set in a worker of `callgate serve --workers N`: /metrics sums every worker's samples.
        self.shared: SharedMetrics | None = None

    def observe_request(
        self, route: str, status: int, total: float, upstream: float, *, streamed: bool
    ) -> None:
        """Record one request; callgate's own share is total minus the upstream wait."""
        counts = self.requests.counts  # Counts.inc, inlined: this runs for every request
        key = (route, status)
        counts[key] = counts.get(key, 0) + 1
        if upstream:
            self.upstream_latency.observe(route, upstream)
            # A stream's duration is the model's, not ours: overhead only for whole bodies.
            if status < 500 and not streamed:
                overhead = total - upstream
                self.overhead.observe(route, overhead if overhead > 0.0 else 0.0)

    def on_audit(self, record: dict[str, Any]) -> None:
        tool = record["tool"]
        gate = record["gate"]
        counts = self.decisions.counts  # Counts.inc, inlined: this runs for every tool call
        key = (tool, gate or "none", record["decision"])
        counts[key] = counts.get(key, 0) + 1
        if record["shadow"]:
            for shadow in record["shadow"]:
                self.shadow_blocks.labels(tool, shadow["gate"]).inc()
        if record["reason"] == "store_error":
            self.store_errors.labels(gate, "fail_closed").inc()
        if record["fail_open"]:
            for failed in record["fail_open"]:
                self.store_errors.labels(failed, "fail_open").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# One sample family as written to the shared directory: name, type, documentation, and
# [sample name, labels, value] per sample.
Family = list[Any]


class _Merged:
    """A collector of already-merged families, for generate_latest."""

    def __init__(self, families: dict[str, Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind, doc, samples in self.families.values():
            metric = Metric(name, doc, kind)
            for sample, labels, value in samples:
                metric.add_sample(sample, labels, value)
            yield metric


class SharedMetrics:
    """/metrics across the workers of `callgate serve --workers N`, aggregated (not labelled by
    worker), after prometheus-client's multiprocess conventions: one file per process in one
    directory (PROMETHEUS_MULTIPROC_DIR, or a temporary one the parent makes and removes),
    wiped when the server starts, and the files of processes that have exited are kept, so a
    counter summed over them never goes down when a worker is restarted. `_created` samples
    are dropped, as prometheus-client does in that mode (a sum of them means nothing).

    Each worker writes its snapshot every `interval` seconds and when it stops; a scrape,
    answered by whichever worker accepts it, adds its own live samples to the others' latest
    snapshots (so they lag by up to `interval`).
    """

    PREFIX = "callgate-"

    def __init__(self, metrics: Metrics, directory: str, interval: float = 1.0) -> None:
        self.metrics = metrics
        self.directory = directory
        self.interval = interval
        self.path = os.path.join(directory, f"{self.PREFIX}{os.getpid()}.json")

    def samples(self) -> list[Family]:
        """This process's samples; on the event loop's thread (the counts are plain dicts)."""
        return [
            [
                m.name,
                m.type,
                m.documentation,
                [[s.name, s.labels, s.value] for s in m.samples if not s.name.endswith("_created")],
            ]
            for m in self.metrics.registry.collect()
        ]

    def write(self, samples: list[Family]) -> None:
        """Blocking: run it off the loop (asyncio.to_thread). Atomic: readers never see half."""
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(samples))
        os.replace(tmp, self.path)

    def merge(self, own: list[Family]) -> bytes:
        """Blocking (reads the other workers' files): run it off the loop."""
        snapshots = [own]
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                name = entry.name
                if (
                    name.startswith(self.PREFIX)
                    and name.endswith(".json")
                    and entry.path != self.path
                ):
                    try:
                        with open(entry.path, "rb") as f:
                            snapshots.append(orjson.loads(f.read()))
                    except (OSError, orjson.JSONDecodeError):
                        continue  # a file being replaced right now: next scrape
        families: dict[str, Family] = {}
        sums: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
        for snapshot in snapshots:
            for name, kind, doc, samples in snapshot:
                if name not in families:
                    families[name] = [name, kind, doc, []]
                    sums[name] = {}
                by_labels = sums[name]
                for sample, labels, value in samples:
                    key = (sample, *sorted(labels.items()))
                    known = by_labels.get(key)
                    if known is None:
                        by_labels[key] = known = [sample, labels, 0.0]
                        families[name][3].append(known)
                    known[2] += value
        return generate_latest(_Merged(families))

    async def run(self) -> None:
        """Write this worker's snapshot every `interval` seconds, and once more when cancelled."""
        try:
            while True:
                await asyncio.to_thread(self.write, self.samples())
                await asyncio.sleep(self.interval)
        finally:
            with contextlib.suppress(OSError):
                self.write(self.samples())  # the last counts of a stopping worker

    async def exposition(self) -> bytes:
        return await asyncio.to_thread(self.merge, self.samples())


def route_label(request: web.Request) -> str:
    path = request.path
    if path.startswith("/v1/chat/completions"):
        return "chat.completions"
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/"):
        return "passthrough"
    return path.strip("/") or "root"
