"""Which gates exist, in the order a call passes them. A new gate is a module with a
`build(tool) -> gate | None` (None: the tool does not use it) and one line here.

Checks run first, in order; then the reservations go to the store together, as one
all-or-nothing reservation (see proxy.gates.base).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.gates import allow, approval, arguments, budget, ratelimit, rules, schema
from proxy.gates.base import Check, Reservation

CHECKS: tuple[Callable[[Any], Check | None], ...] = (
    arguments.build,
    allow.build,
    schema.build,
    rules.build,
    approval.build,  # after the rules, before any reservation: a held call consumes nothing
)
RESERVATIONS: tuple[Callable[[Any], Reservation | None], ...] = (
    ratelimit.build,
    budget.build,
)
# Every gate name a call can be blocked by, in order (explain lists each one).
NAMES = ("rules", approval.GATE, ratelimit.GATE, budget.GATE)
# Listed by explain only for tools that use them (most tools never do).
OPTIONAL = frozenset((approval.GATE,))


def compile_gates(tool: Any) -> tuple[tuple[Check, ...], tuple[Reservation, ...]]:
    """The tool's checks and reservations, in order: built once per tool at policy load."""
    checks = tuple(g for g in (build(tool) for build in CHECKS) if g is not None)
    reservations = tuple(g for g in (build(tool) for build in RESERVATIONS) if g is not None)
    return checks, reservations
