"""What the running app holds: the current policy and the long-lived services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.audit import Auditor
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.store import Store
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.tracing import Tracing


@dataclass
class AppState:
    # Swapped whole on reload; a request reads it once and keeps its policy to the end.
    policy: Policy
    store: Store
    auditor: Auditor
    upstream: Upstream
    metrics: Metrics = field(default_factory=Metrics)
    config_path: str | None = None
    draining: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    tracing: Tracing | None = None  # OpenTelemetry, when on (proxy.telemetry)
    streams: int = 0  # gated streams being served now (proxy.delivery: the audit write window)


STATE: web.AppKey[AppState] = web.AppKey("callgate_state", AppState)
