"""ISO-8601 UTC timestamps for log lines and audit records, cheap enough for every request.

`datetime.now(UTC).isoformat()` costs about 2 µs; the date-and-seconds part changes once a
second, so it is formatted once per second and only the microseconds are added per call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

# (a whole second, its "YYYY-MM-DDTHH:MM:SS." prefix), replaced as one object so that a thread
# logging at the turn of a second never pairs one second with another's prefix.
_cache: tuple[int, str] = (-1, "")


def utc_iso(now: float | None = None) -> str:
    """`now` (default: the current time) as `datetime.isoformat(timespec="microseconds")` in UTC,
    e.g. `2026-11-25T10:41:30.123456+00:00`."""
    global _cache
    if now is None:
        now = time.time()
    second = int(now)
    cached, prefix = _cache
    if second != cached:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _cache = (second, prefix)
    micros = int((now - second) * 1_000_000)
    return f"{prefix}{micros:06d}+00:00"
