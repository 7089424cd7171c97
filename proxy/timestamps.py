"""ISO-8601 UTC timestamps for log lines and audit records, cheap enough for every request.

`datetime.now(UTC).isoformat()` costs about 2 µs; the date-and-seconds part changes once a
second, so it is formatted once per second. The fractional part is looked up, not formatted:
a `%06d` (or `:06d`) format costs more than the rest of the call together, so the
microseconds are two table entries of three digits each (milliseconds, then the rest with the
zone suffix). The current time is read as integer nanoseconds: no float arithmetic per call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

# (a whole second, its "YYYY-MM-DDTHH:MM:SS." prefix), replaced as one object so that a thread
# logging at the turn of a second never pairs one second with another's prefix.
_cache: tuple[int, str] = (-1, "")
_MILLIS = tuple(f"{n:03d}" for n in range(1000))  # "000" ... "999"
_MICROS = tuple(f"{n:03d}+00:00" for n in range(1000))  # "000+00:00" ... "999+00:00"
_time_ns = time.time_ns


def utc_iso(now: float | None = None) -> str:
    """`now` (default: the current time) as `datetime.isoformat(timespec="microseconds")` in UTC,
    e.g. `2026-11-25T10:41:30.123456+00:00`. Microseconds are truncated, not rounded."""
    global _cache
    if now is None:
        micros = _time_ns() // 1000
    else:
        whole = int(now)
        micros = whole * 1_000_000 + int((now - whole) * 1_000_000)
    millis = micros // 1000
    second = millis // 1000
    cached, prefix = _cache
    if second != cached:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _cache = (second, prefix)
    return prefix + _MILLIS[millis - second * 1000] + _MICROS[micros - millis * 1000]
