"""deploy/grafana/callgate.json queries only metrics callgate exports: every PromQL expression's
metric names are checked against the /metrics of a real app that served a few requests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import completion

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "callgate.json"

POLICY = {
    "tools": {
        "get_weather": {"rate_limit": {"max_calls": 1, "window": 60}},
        "search_web": {"rules": [{"name": "no_pii", "deny_if": 'args.query.contains("ssn")'}]},
    },
    "on_block": "strip",
}

# PromQL's functions, aggregations and keywords: any other identifier is a metric name.
PROMQL_WORDS = frozenset(
    """sum avg min max count topk bottomk quantile stddev stdvar group count_values by without
    on ignoring group_left group_right and or unless offset bool rate irate increase delta idelta
    deriv histogram_quantile label_values label_replace label_join abs ceil floor round clamp
    clamp_min clamp_max sort sort_desc time vector scalar absent absent_over_time resets changes
    avg_over_time sum_over_time max_over_time min_over_time count_over_time
    inf nan""".split()
)
# Strings, label matchers {...}, range and subquery selectors [...], grouping clauses (...),
# and Grafana's variables: none of them name a metric.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def expressions(node: Any) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and "label_values" in value:
                found.append(value)
            else:
                found += expressions(value)
    elif isinstance(node, list):
        for item in node:
            found += expressions(item)
    return found


def metric_names(expr: str) -> set[str]:
    if expr.startswith("label_values("):
        # label_values(metric{...}, label): only the first argument is a metric.
        match = _LABEL_VALUES.match(expr)
        assert match, expr
        return {match.group(1)}
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    text = _VARIABLE.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        after = text[match.end() :].lstrip()
        if word in PROMQL_WORDS or after.startswith("("):
            continue
        # A number's exponent (1e-3) is not a name.
        if match.start() and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue
        names.add(word)
    return names


def exported(exposition: str) -> set[str]:
    """Series names a scrape of this exposition gives Prometheus: a counter's name ends in
    _total, a histogram is its _bucket, _sum and _count series."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(" ", 3)
        if kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif kind == "counter":
            base = name.removesuffix("_total")
            names |= {base + "_total", base + "_created"}
        else:
            names.add(name)
    return names


def test_metric_names_are_parsed_from_expressions() -> None:
    """The parser the check relies on finds names and only names (else the check proves
    nothing)."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, route) (rate(x_bucket{job=~"$job", a="b(c)"}'
        "[$__rate_interval])))"
    ) == {"x_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / sum(rate(b_total[5m])) > 1e-3") == {
        "a_total",
        "b_total",
    }
    assert metric_names('label_values(callgate_requests_total{job=~"$job"}, instance)') == {
        "callgate_requests_total"
    }
    assert metric_names("up") == {"up"}  # not callgate's: the check below would refuse it


async def test_every_dashboard_expression_names_an_exported_metric(
    make_proxy: Any, upstream: Any
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "callgate"
    proxy = await make_proxy(POLICY)
    upstream.push(
        completion(("get_weather", {"city": "Paris"})),
        completion(("get_weather", {"city": "Oslo"})),  # rate-limited
        completion(("search_web", {"query": "ssn of bob"})),  # rule block
    )
    client = proxy.client()
    for _ in range(3):
        await client.chat.completions.create(model="gpt-test", messages=[])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.root.rstrip("/") + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    names = exported(text)
    # The scrape is of a real app that served calls: its core series are there.
    assert {
        "callgate_requests_total",
        "callgate_tool_call_decisions_total",
        "callgate_proxy_overhead_seconds_bucket",
    } <= names

    exprs = expressions(dashboard)
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        found = metric_names(expr)
        assert found, f"no metric in {expr!r}"
        missing = found - names
        assert not missing, f"{expr!r} names {sorted(missing)}, which callgate does not export"
        used |= found
    # Each family callgate exports is on the dashboard (the histograms through any series).
    families = {
        line.split(" ")[2].removesuffix("_total")
        for line in text.splitlines()
        if line.startswith("# TYPE ") and not line.split(" ")[2].endswith("_created")
    }
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families - shown == set()
