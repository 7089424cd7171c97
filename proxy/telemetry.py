"""Whether OpenTelemetry tracing is on, decided once at start.

Off (the default), nothing of OpenTelemetry is imported and the request path pays one `is None`
test per hook. On, `proxy.tracing` is imported and does the work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.config import TelemetryConfig

if TYPE_CHECKING:
    from proxy.tracing import RequestTrace, Tracing

# The request's trace (proxy.tracing.RequestTrace), set by the tracing middleware.
TRACE: web.RequestKey[Any] = web.RequestKey("callgate_trace", object)
EXPORTERS = frozenset(("otlp", "console"))


class TelemetryError(Exception):
    """Tracing cannot start as configured (an unknown exporter, the packages missing)."""


def exporters(config: TelemetryConfig, env: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters to run: none when tracing is off.

    On when `telemetry.traces` is true, or unset and OTEL_TRACES_EXPORTER names an exporter
    (so `OTEL_TRACES_EXPORTER=otlp` and an endpoint variable are enough); never when
    OTEL_SDK_DISABLED is true. Unknown exporter names are refused at start."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or config.traces is False:
        return []
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    named = [n for n in named if n]
    if "none" in named:
        return []
    unknown = [n for n in named if n not in EXPORTERS]
    if unknown:
        raise TelemetryError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not an exporter callgate has "
            f"(it has {', '.join(sorted(EXPORTERS))}, or none)"
        )
    if config.traces is None:
        return named
    return named or ["otlp"]


def start_tracing(config: TelemetryConfig) -> Tracing | None:
    """The app's tracing, or None when it is off."""
    names = exporters(config)
    if not names:
        return None
    try:
        from proxy.tracing import Tracing
    except ImportError as exc:
        raise TelemetryError(
            f"tracing is on, but the OpenTelemetry packages are not installed ({exc}): "
            "pip install 'callgate[otel]'"
        ) from None
    return Tracing(config, names)


def request_trace(request: web.Request) -> RequestTrace | None:
    # Not request.get(): a missing key raises and catches a KeyError inside (see incoming.py).
    return request._state.get(TRACE)
