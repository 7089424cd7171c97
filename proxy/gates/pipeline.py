"""One pipeline per tool call: the tool's gates in order (proxy.gates.registry), then the
decision.

Checks run one after another; a block stops the call (or, in shadow mode, is recorded and the
rest of its group is skipped). The reservations (rate-limit slot, budget charge) then go to the
store as one all-or-nothing reservation, so a budget block never leaves a rate-limit slot
consumed. Audit happens after the response's fate is known (see proxy.audit), so a call
withheld for another call's sake is recorded as such.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from proxy.gates.base import Check, Reservation, StoreItem
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy, ToolPolicy
from proxy.store import Reservation as StoreAnswer
from proxy.store import Store, StoreError
from proxy.toolcalls import CallContext, ToolCall

log = structlog.get_logger("callgate.gates")
MAX_DERIVED = 50_000  # cached reservation items per policy: bounded by principals x tools


async def decide(call: ToolCall, policy: Policy, store: Store, ctx: CallContext) -> Decision:
    started = time.perf_counter()
    policy = policy.effective(ctx)  # the identity's overlays (proxy.overlays); derived is its own
    tool = policy.for_tool(call.name)
    decision = Decision(call=call, tool_policy=tool.name, on_block=tool.on_block)
    try:
        if not await _checks(decision, tool.checks, ctx):
            await _reserve(decision, tool, policy, store, ctx)
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


async def _checks(decision: Decision, checks: tuple[Check, ...], ctx: CallContext) -> bool:
    """Run the checks in order; True when one blocked (enforced) and the call is decided."""
    shadowed: str | None = None  # a group that blocked in shadow mode: the rest is skipped
    for gate in checks:
        if gate.name == shadowed or (gate.needs_args and decision.unread):
            continue
        block = gate.check(decision, ctx)
        # A sync check answers a Block or None; anything else is an async check's awaitable
        # (a type test per gate, where inspect.isawaitable walked several).
        if block is not None and not isinstance(block, Block):
            block = await block
        if block is not None:
            if _stop(decision, block, gate.enforce):
                return True
            shadowed = gate.name
    return False


Items = tuple[Sequence[StoreItem], tuple[Reservation, ...]]


async def decide_many(
    calls: list[ToolCall], policy: Policy, store: Store, ctx: CallContext
) -> list[Decision]:
    """A response's calls decided together: each call's checks in order, then every call's
    reservation in one store round trip (Redis: one script run), each all-or-nothing on its
    own and in order, so parallel calls to one tool take slots first-come as if decided one
    after another."""
    started = time.perf_counter()
    policy = policy.effective(ctx)
    decisions: list[Decision] = []
    pending: list[tuple[Decision, Items]] = []
    for call in calls:
        tool = policy.for_tool(call.name)
        decision = Decision(call=call, tool_policy=tool.name, on_block=tool.on_block)
        decisions.append(decision)
        try:
            if not await _checks(decision, tool.checks, ctx) and tool.reservations:
                items = _items(decision, tool, ctx, policy.derived)
                if items is not None:
                    pending.append((decision, items))
        except Exception as exc:
            _gate_error(decision, exc)
    if pending:
        results: list[StoreAnswer | BaseException]
        try:
            results = list(await store.reserve_many([items[0] for _, items in pending]))
        except Exception as exc:
            results = [exc] * len(pending)
        for (decision, (requests, gates)), result in zip(pending, results, strict=True):
            try:
                _apply(decision, requests, gates, result)
            except Exception as exc:
                _gate_error(decision, exc)
                await release(store, [decision])
    elapsed = (time.perf_counter() - started) * 1000
    for decision in decisions:
        decision.latency_ms = elapsed
    return decisions


def _gate_error(decision: Decision, exc: Exception) -> None:
    log.exception("gate_error", tool=decision.call.name, call_id=decision.call.id, exc_info=exc)
    decision.block = Block("rules", "gate_error", f"Gate error: {type(exc).__name__}: {exc}")


async def _reserve(
    decision: Decision, tool: ToolPolicy, policy: Policy, store: Store, ctx: CallContext
) -> None:
    if not tool.reservations:
        return
    items = _items(decision, tool, ctx, policy.derived)
    if items is None:
        return
    requests, gates = items
    result: StoreAnswer | BaseException
    try:
        result = await store.reserve(requests)
    except Exception as exc:
        result = exc
    _apply(decision, requests, gates, result)


def _apply(
    decision: Decision,
    requests: Sequence[StoreItem],
    gates: tuple[Reservation, ...],
    result: StoreAnswer | BaseException,
) -> None:
    """The store's answer to the call's reservation, or the error it failed with."""
    if isinstance(result, BaseException):
        exc = result
        reason = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        log.warning("store_error", error=reason, tool=decision.call.name, call_id=decision.call.id)
        for item, gate in zip(requests, gates, strict=True):
            block = Block(gate.name, "store_error", f"Store unavailable: {reason}")
            if gate.on_store_error == "fail_open":
                decision.fail_open.append(gate.name)
            elif _stop(decision, block, item.enforce):
                return
        return
    decision.token = result.token
    for item, outcome, gate in zip(requests, result.outcomes, gates, strict=True):
        if not outcome.ok and _stop(decision, gate.block_for(outcome, item), item.enforce):
            return


def _items(
    decision: Decision, tool: ToolPolicy, ctx: CallContext, derived: dict[object, object]
) -> Items | None:
    """The store items of the call's reservations (None when a Block stopped it). Items that
    depend only on the tool and the principal are built once per pair and kept with the
    policy (as tuples); the store never mutates them."""
    reservations = tool.reservations
    constant = all(gate.constant for gate in reservations)
    key = (tool.name, decision.call.name, ctx.principal)
    if constant:
        cached = derived.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
    requests: list[StoreItem] = []
    gates: list[Reservation] = []
    for gate in reservations:
        item = gate.request(decision, ctx)
        if isinstance(item, Block):
            # Cannot be priced: an enforced gate stops the call, a shadow one is left out.
            if _stop(decision, item, gate.enforce):
                return None
            continue
        requests.append(item)
        gates.append(gate)
    # A tuple when kept (the Redis store then keeps what it makes of it, per tuple); a call's
    # own items (priced by its arguments) stay a list, so nothing keeps them.
    items = (tuple(requests) if constant else requests, tuple(gates))
    if constant:
        if len(derived) >= MAX_DERIVED:
            derived.clear()
        derived[key] = items
    return items if requests else None


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
