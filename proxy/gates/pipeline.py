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
from proxy.policy import Policy
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


async def _run(decision: Decision, tool, policy: Policy, store: Store, ctx: CallContext) -> None:  # type: ignore[no-untyped-def]
    call = decision.call
    rules_enforce = tool.rules_mode == "enforce"
    args, block = parse_arguments(call)
    decision.args = args
    if block is None:
        block = check_rules(tool, call, args, ctx)
    if block is not None and _stop(decision, block, rules_enforce):
        return

    items: list[SlotRequest | ChargeRequest] = []
    configs: list[tuple[str, str, object]] = []  # (gate, on_store_error, config)
    if tool.rate_limit is not None:
        rl = tool.rate_limit
        items.append(ratelimit_gate.slot_request(tool.namespace, call.name, ctx.principal, rl))
        configs.append((ratelimit_gate.GATE, rl.on_store_error, rl))
    if tool.budget is not None:
        use = tool.budget.use
        try:
            cost = budget_gate.cost_of(tool.budget, call, args, ctx)
        except ValueError as exc:
            block = Block(budget_gate.GATE, "cost_error", f"Budget: {exc}")
            if _stop(decision, block, use.mode == "enforce"):
                return
        else:
            items.append(budget_gate.charge_request(tool.budget, ctx.principal, cost))
            configs.append((budget_gate.GATE, use.on_store_error, use))
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
