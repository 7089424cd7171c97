"""The budget gate: a call's cost charged to a named ledger, exact to the micro-unit."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from proxy.config import MICROS
from proxy.gates.decision import Block, Decision
from proxy.gates.ratelimit import scope_key
from proxy.policy import Budget, to_micros
from proxy.store import ChargeRequest, Outcome, SlotRequest, key_part
from proxy.toolcalls import CallContext, ToolCall

GATE = "budget"
CENTS = Decimal("0.01")


def format_money(micros: int) -> str:
    """4990000 -> "4.99"; at least two places, more only when the amount needs them."""
    amount = (Decimal(micros) * MICROS).normalize()
    if amount.as_tuple().exponent > -2:  # type: ignore[operator]
        amount = amount.quantize(CENTS)
    return f"{amount:f}"


def cost_of(budget: Budget, call: ToolCall, args: Any, ctx: CallContext) -> int:
    """The call's cost in micro-units. Raises ValueError when an expression cannot price it."""
    if budget.cost_micros is not None:
        return budget.cost_micros
    assert budget.cost_program is not None
    variables = {"args": args, "tool": call.name, "principal": ctx.principal}
    try:
        value = budget.cost_program.run(variables)
    except Exception as exc:
        raise ValueError(f"cost expression failed: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"cost expression returned {type(value).__name__}, not a number")
    try:
        amount = Decimal(repr(value)).quantize(MICROS, rounding=ROUND_HALF_UP)
    except InvalidOperation:
        raise ValueError(f"cost expression returned {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"cost expression returned {value!r}, not a non-negative amount")
    return to_micros(amount)


def charge_request(budget: Budget, principal: str, cost_micros: int) -> ChargeRequest:
    ledger = budget.ledger_config
    key = f"budget:{key_part(budget.ledger, '@')}@{scope_key(ledger.scope, principal)}"
    return ChargeRequest(
        key, budget.max_micros, ledger.window, cost_micros, budget.use.mode == "enforce"
    )


def block_for(outcome: Outcome, request: ChargeRequest) -> Block:
    message = (
        f"Budget exceeded: {format_money(outcome.spent_micros)} + "
        f"{format_money(request.cost_micros)} > {format_money(request.max_micros)}"
    )
    return Block(GATE, "max_spend", message, outcome.retry_after)


@dataclass(frozen=True, slots=True)
class BudgetGate:
    budget: Budget
    name: str = GATE
    kind: str = GATE

    @property
    def enforce(self) -> bool:
        return self.budget.use.mode == "enforce"

    @property
    def on_store_error(self) -> str:
        return self.budget.use.on_store_error

    @property
    def constant(self) -> bool:
        return self.budget.cost_micros is not None

    def request(self, decision: Decision, ctx: CallContext) -> ChargeRequest | Block:
        try:
            cost = cost_of(self.budget, decision.call, decision.args, ctx)
        except ValueError as exc:
            return Block(GATE, "cost_error", f"Budget: {exc}")
        return charge_request(self.budget, ctx.principal, cost)

    def block_for(self, outcome: Outcome, item: SlotRequest | ChargeRequest) -> Block:
        assert isinstance(item, ChargeRequest)
        return block_for(outcome, item)

    def describe_item(self, item: SlotRequest | ChargeRequest) -> str:
        assert isinstance(item, ChargeRequest)
        ledger = self.budget.ledger_config
        return (
            f"cost {format_money(item.cost_micros)} against ledger {self.budget.ledger!r} "
            f"({ledger.max_spend} per {ledger.window:g}s)"
        )


def build(tool: Any) -> BudgetGate | None:
    return None if tool.budget is None else BudgetGate(tool.budget)
