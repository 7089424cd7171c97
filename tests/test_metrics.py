"""The lock-free request metrics expose exactly what prometheus_client's own types would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from proxy.metrics import Counts, Metrics, RouteHistogram

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.01, 1, 10)


def _samples(registry: CollectorRegistry, prefix: str) -> set[str]:
    text = generate_latest(registry).decode()
    return {
        line
        for line in text.splitlines()
        if line.startswith(prefix) and "_created" not in line and not line.startswith("#")
    }


def test_route_histogram_matches_prometheus_client() -> None:
    rng = random.Random(7)
    values = [rng.choice((rng.uniform(0, 0.002), rng.uniform(0, 20))) for _ in range(500)]
    values += list(BUCKETS)  # a value on a bound counts in that bucket (le)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = RouteHistogram("x_seconds", "doc", BUCKETS)
    ours_registry.register(ours)  # type: ignore[arg-type]
    theirs = Histogram("x_seconds", "doc", ["route"], buckets=BUCKETS, registry=theirs_registry)
    for i, value in enumerate(values):
        route = ("a", "b")[i % 2]
        ours.observe(route, value)
        theirs.labels(route).observe(value)
    expected = _samples(theirs_registry, "x_seconds")
    assert len(expected) == 2 * (len(BUCKETS) + 3)  # buckets, +Inf, count, sum per route
    got = _samples(ours_registry, "x_seconds")
    # Sums are equal up to float addition order; compare them numerically.
    sums = {s for s in expected if "_sum" in s}
    assert got - {s for s in got if "_sum" in s} == expected - sums
    for line in sums:
        name = line.rsplit(" ", 1)[0]
        (mine,) = [g for g in got if g.startswith(name + " ")]
        assert abs(float(mine.rsplit(" ", 1)[1]) - float(line.rsplit(" ", 1)[1])) < 1e-9


def test_request_counts_match_prometheus_client() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = Counts("req", "doc", ("route", "status"))
    ours_registry.register(ours)  # type: ignore[arg-type]
    theirs = Counter("req", "doc", ["route", "status"], registry=theirs_registry)
    for route, status in [("chat", 200), ("chat", 200), ("chat", 403), ("responses", 200)]:
        ours.inc(route, str(status))
        theirs.labels(route, str(status)).inc()
    assert _samples(ours_registry, "req") == _samples(theirs_registry, "req")
    assert 'req_total{route="chat",status="200"} 2.0' in _samples(ours_registry, "req")


def test_status_counted_as_int_is_exposed_as_its_label() -> None:
    """observe_request counts a status as its int: the sample is the same as for its text."""
    metrics = Metrics()
    theirs_registry = CollectorRegistry()
    theirs = Counter(
        "callgate_requests", "HTTP requests served", ["route", "status"], registry=theirs_registry
    )
    for route, status in [("chat", 200), ("chat", 200), ("chat", 403), ("responses", 200)]:
        metrics.observe_request(route, status, 0.01, 0.0, streamed=False)
        theirs.labels(route, str(status)).inc()
    metrics.requests.inc("chat", "200")  # the same label value, counted as text
    theirs.labels("chat", "200").inc()
    prefix = "callgate_requests"
    assert _samples(metrics.registry, prefix) == _samples(theirs_registry, prefix)
