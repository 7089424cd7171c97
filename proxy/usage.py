"""Token usage summed over reprompt rounds: every round is billed, so every round is reported."""

from __future__ import annotations

from typing import Any

import orjson


def add_usage(total: dict[str, Any] | None, usage: Any) -> dict[str, Any] | None:
    """`total` plus `usage` (nested *_details too). With no total yet, a deep copy of `usage`."""
    if not isinstance(usage, dict):
        return total
    if total is None:
        # A copy: totals must not alias a round's dicts.
        copy: dict[str, Any] = orjson.loads(orjson.dumps(usage))
        return copy
    _sum_into(total, usage)
    return total


def _sum_into(total: dict[str, Any], usage: dict[str, Any]) -> None:
    for key, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            prev = total.get(key)
            total[key] = (prev if isinstance(prev, int) else 0) + value
        elif isinstance(value, dict):
            inner = total.get(key)
            if not isinstance(inner, dict):
                inner = total[key] = {}
            _sum_into(inner, value)
