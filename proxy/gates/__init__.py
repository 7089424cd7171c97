"""The gates a tool call passes, in order: rules -> rate limit -> budget -> audit."""

from proxy.gates.decision import Decision
from proxy.gates.pipeline import decide, decide_many, release

__all__ = ["Decision", "decide", "decide_many", "release"]
