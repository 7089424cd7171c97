"""The gates a tool call passes, in order: rules -> rate limit -> budget -> audit."""

from proxy.gates.decision import Decision
from proxy.gates.pipeline import decide, release

__all__ = ["Decision", "decide", "release"]
