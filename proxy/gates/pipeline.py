"""One pipeline per tool call: rules -> rate limit + budget (reserved together) -> decision.

The rate-limit slot and the budget charge go to the store as one all-or-nothing reservation, so
a budget block never leaves a rate-limit slot consumed. Audit happens after the response's fate
is known (see proxy.audit), so a call withheld for another call's sake is recorded as such.
"""

from __future__ import annotations

import time

import structlog

from proxy.gates import budget as budget_gate
from proxy.gates import ratelimit as ratelimit_gate
from proxy.gates.decision import Block, Decision
from proxy.gates.rules import check_rules, parse_arguments
from proxy.policy import Policy, ToolPolicy
from proxy.store import ChargeRequest, SlotRequest, Store, StoreError
from proxy.toolcalls import CallContext, ToolCall

log = structlog.get_logger("callgate.gates")


async def decide(call: ToolCall, policy: Policy, store: Store, ctx: CallContext) -> Decision:
    started = time.perf_counter()
    tool = policy.for_tool(call.name)
    decision = Decision(call=call, tool_policy=tool.name, on_block=tool.on_block)
    try:
        await _run(decision, tool, policy, store, ctx)
    except Exception as exc:
        # A gate that cannot decide blocks: the policy fails closed, the request carries on.
        log.exception("gate_error", tool=call.name, call_id=call.id)
        if decision.token:
            await release(store, [decision])
        decision.block = Block("rules", "gate_error", f"Gate error: {type(exc).__name__}: {exc}")
    finally:
        decision.latency_ms = (time.perf_counter() - started) * 1000
    return decision


def _stop(decision: Decision, block: Block, enforce: bool) -> bool:
    """Record a block; True when it is enforced and the pipeline must stop."""
    if enforce:
        decision.block = block
        return True
    decision.shadow.append(block)
    return False


async def _run(
    decision: Decision, tool: ToolPolicy, policy: Policy, store: Store, ctx: CallContext
) -> None:
    call = decision.call
    rules_enforce = tool.rules_mode == "enforce"
    args, block = parse_arguments(call)
    decision.args = args
    if block is None:
        block = check_rules(tool, call, args, ctx)
    if block is not None and _stop(decision, block, rules_enforce):
        return

    requests = _store_requests(tool, call, args, ctx, policy.derived)
    if isinstance(requests, Block):
        assert tool.budget is not None
        if _stop(decision, requests, tool.budget.use.mode == "enforce"):
            return
        requests = _store_requests(tool, call, args, ctx, policy.derived, with_budget=False)
        assert not isinstance(requests, Block)
    items, configs = requests
    if not items:
        return

    try:
        reservation = await store.reserve(items)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        log.warning("store_error", error=reason, tool=call.name, call_id=call.id)
        for item, (gate, on_error, _cfg) in zip(items, configs, strict=True):
            block = Block(gate, "store_error", f"Store unavailable: {reason}")
            if on_error == "fail_open":
                decision.fail_open.append(gate)
            elif _stop(decision, block, item.enforce):
                return
        return

    decision.token = reservation.token
    for item, outcome, (_gate, _on_error, cfg) in zip(
        items, reservation.outcomes, configs, strict=True
    ):
        if outcome.ok:
            continue
        if isinstance(item, SlotRequest):
            block = ratelimit_gate.block_for(outcome, cfg)  # type: ignore[arg-type]
        else:
            block = budget_gate.block_for(outcome, item)
        if _stop(decision, block, item.enforce):
            return


Requests = tuple[
    tuple[SlotRequest | ChargeRequest, ...],
    tuple[tuple[str, str, object], ...],  # per item: (gate, on_store_error, config)
]
MAX_DERIVED = 50_000  # cached request sets per policy: bounded by principals x tools


def _store_requests(
    tool: ToolPolicy,
    call: ToolCall,
    args: object,
    ctx: CallContext,
    derived: dict[object, object],
    with_budget: bool = True,
) -> Requests | Block:
    """The rate-limit slot and budget charge to reserve for a call (a Block when its cost
    cannot be priced). They depend only on the tool, the principal and a constant cost, so they
    are built once per pair and kept with the policy; the store never mutates them."""
    budget = tool.budget if with_budget else None
    constant = budget is None or budget.cost_micros is not None
    key = (tool.name, call.name, ctx.principal, with_budget)
    if constant:
        cached = derived.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
    items: list[SlotRequest | ChargeRequest] = []
    configs: list[tuple[str, str, object]] = []
    if tool.rate_limit is not None:
        rl = tool.rate_limit
        items.append(ratelimit_gate.slot_request(tool.namespace, call.name, ctx.principal, rl))
        configs.append((ratelimit_gate.GATE, rl.on_store_error, rl))
    if budget is not None:
        try:
            cost = budget_gate.cost_of(budget, call, args, ctx)
        except ValueError as exc:
            return Block(budget_gate.GATE, "cost_error", f"Budget: {exc}")
        items.append(budget_gate.charge_request(budget, ctx.principal, cost))
        configs.append((budget_gate.GATE, budget.use.on_store_error, budget.use))
    requests = (tuple(items), tuple(configs))
    if constant:
        if len(derived) >= MAX_DERIVED:
            derived.clear()
        derived[key] = requests
    return requests


async def release(store: Store, decisions: list[Decision]) -> None:
    """Give back the slots and charges of calls that were allowed but never delivered."""
    token = [entry for d in decisions for entry in d.token]
    if not token:
        return
    try:
        await store.release(token)
    except Exception as exc:
        log.warning("store_release_failed", error=str(exc), entries=len(token))
    for d in decisions:
        d.token = []
