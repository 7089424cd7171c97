"""What the policy models share: the base model, and the parsing of durations and money.

A module of its own so that `proxy.config` and the section modules split out of it
(`proxy.config_auth`) import it without importing each other; `proxy.config` re-exports it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

MICROS = Decimal("0.000001")
MAX_MONEY = Decimal(2**53) * MICROS  # micro-units stay exact integers in Lua's doubles
_NUMERIC = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "90", "1.5s", "5m", "1h", "1d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration (seconds, or e.g. '5m', '1h')")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"invalid duration {value!r} (seconds, or e.g. '5m', '1h')")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


def parse_money(value: Any) -> Decimal:
    """An exact decimal amount with at most 6 places (money is kept in integer micro-units)."""
    if isinstance(value, bool):
        raise ValueError('expected a decimal amount such as "0.01"')
    try:
        amount = Decimal(str(value).strip())
        if not amount.is_finite() or amount < 0:
            raise ValueError("amount must be a finite, non-negative decimal")
        if amount >= MAX_MONEY:
            raise ValueError(f"amount must be below {MAX_MONEY}")
        if amount != amount.quantize(MICROS):
            raise ValueError("amount has more than 6 decimal places")
    except (InvalidOperation, ArithmeticError):
        raise ValueError(f"invalid decimal amount {value!r}") from None
    return amount


def looks_numeric(value: Any) -> bool:
    """Whether a `cost` is meant as a number (and must then be a valid amount), not CEL."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return True
    return bool(_NUMERIC.match(str(value)))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
