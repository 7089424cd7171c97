"""The gate pipeline on its own: priced calls, shadow budgets, and the per-policy request cache."""

from __future__ import annotations

import pytest

from proxy.gates import decide, pipeline
from proxy.policy import load_policy_text
from proxy.store.memory import MemoryStore
from proxy.toolcalls import CallContext, ToolCall

POLICY = """
upstream: {{base_url: "http://127.0.0.1:9/v1"}}
budgets:
  ledger: {{max_spend: "1.00", window: 3600}}
tools:
  fetch:
    rate_limit: {{max_calls: 3, window: 60}}
    budget: {{ledger: ledger, cost: "{cost}", mode: {mode}}}
"""


def ctx(principal: str = "alice") -> CallContext:
    return CallContext(principal=principal, request_id="r", route="chat.completions")


def call(args: str) -> ToolCall:
    return ToolCall("call_1", "fetch", args)


async def test_cost_expression_prices_each_call() -> None:
    policy = load_policy_text(POLICY.format(cost="0.25 * double(size(args.urls))", mode="enforce"))
    store = MemoryStore()
    first = await decide(call('{"urls": ["a", "b"]}'), policy, store, ctx())  # 0.50
    second = await decide(call('{"urls": ["a"]}'), policy, store, ctx())  # 0.75
    third = await decide(call('{"urls": ["a", "b"]}'), policy, store, ctx())  # 1.25 > 1.00
    assert first.allowed and second.allowed
    assert third.block is not None and third.block.reason == "max_spend"
    assert third.block.message == "Budget exceeded: 0.75 + 0.50 > 1.00"


async def test_unpriceable_call_is_blocked_without_taking_a_slot() -> None:
    policy = load_policy_text(POLICY.format(cost="args.price", mode="enforce"))
    store = MemoryStore()
    for _ in range(3):
        d = await decide(call("{}"), policy, store, ctx())
        assert d.block is not None and d.block.reason == "cost_error"
    # The three blocked calls took no rate-limit slot: three priced calls still pass.
    for _ in range(3):
        assert (await decide(call('{"price": 0.1}'), policy, store, ctx())).allowed
    d = await decide(call('{"price": 0.1}'), policy, store, ctx())
    assert d.block is not None and d.block.reason == "max_calls"


async def test_shadow_budget_that_cannot_price_still_rate_limits() -> None:
    policy = load_policy_text(POLICY.format(cost="args.price", mode="shadow"))
    store = MemoryStore()
    for _ in range(3):
        d = await decide(call("{}"), policy, store, ctx())
        assert d.allowed
        assert [b.reason for b in d.shadow] == ["cost_error"]
    d = await decide(call("{}"), policy, store, ctx())
    assert d.block is not None and d.block.reason == "max_calls"


async def test_cached_requests_stay_per_principal_when_the_cache_overflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "MAX_DERIVED", 2)
    policy = load_policy_text(POLICY.format(cost="0.01", mode="enforce"))
    store = MemoryStore()
    principals = [f"user-{i}" for i in range(5)]
    for _ in range(3):
        for p in principals:
            assert (await decide(call("{}"), policy, store, ctx(p))).allowed
    for p in principals:
        d = await decide(call("{}"), policy, store, ctx(p))
        assert d.block is not None and d.block.reason == "max_calls"
    assert len(policy.derived) <= 2


SCHEMA_POLICY = """
upstream: {{base_url: "http://127.0.0.1:9/v1"}}
tools:
  fetch:
    arguments_schema: {schema}
"""


@pytest.mark.parametrize(
    ("schema", "compiled"),
    [
        ("{type: object, required: [url], properties: {url: {type: string}}}", True),
        (
            "{type: object, required: [url], properties: {url: {$ref: '#/$defs/u'}},"
            " $defs: {u: {type: string}}}",
            False,
        ),
    ],
)
async def test_schema_gate_same_verdicts_with_or_without_a_compiled_check(
    schema: str, compiled: bool
) -> None:
    policy = load_policy_text(SCHEMA_POLICY.format(schema=schema))
    assert (policy.tools["fetch"].schema_check is not None) is compiled
    store = MemoryStore()
    ok = await decide(call('{"url": "https://x"}'), policy, store, ctx())
    missing = await decide(call('{"other": 1}'), policy, store, ctx())
    wrong = await decide(call('{"url": 3}'), policy, store, ctx())
    deep = await decide(call('{"url": ' + "[" * 500 + "]" * 500 + "}"), policy, store, ctx())
    assert ok.allowed
    assert missing.block is not None
    assert missing.block.message == "Invalid arguments: 'url' is a required property"
    assert wrong.block is not None
    assert wrong.block.message == "Invalid arguments at url: 3 is not of type 'string'"
    assert deep.block is not None and deep.block.reason == "invalid_arguments"


async def test_decide_many_matches_one_by_one_and_reserves_once(monkeypatch) -> None:
    """A response's calls decided together: the same decisions as one after another (slots
    first-come, in order), with a single store round trip for all reservations."""
    from proxy.gates import decide_many

    text = POLICY.format(cost="0.25 * double(size(args.urls))", mode="enforce")
    calls = [call('{"urls": ["a"]}'), call("{}"), call('{"urls": ["a", "b"]}'), call("[1")]
    calls += [call('{"urls": ["a"]}'), call('{"urls": ["a"]}')]
    one_by_one_store, together_store = MemoryStore(), MemoryStore()
    policy = load_policy_text(text)
    expected = [await decide(c, policy, one_by_one_store, ctx()) for c in calls]
    trips = []
    real = together_store.reserve_many

    async def counted(batch):
        trips.append(len(batch))
        return await real(batch)

    monkeypatch.setattr(together_store, "reserve_many", counted)
    got = await decide_many(calls, load_policy_text(text), together_store, ctx())
    assert [(d.call.arguments, d.block and d.block.reason) for d in got] == [
        (d.call.arguments, d.block and d.block.reason) for d in expected
    ]
    # 0.25 + 0.50 + 0.25 reach the 1.00 budget exactly; the sixth call is the fourth slot.
    assert [d.block and d.block.reason for d in got] == [
        None, "cost_error", None, "invalid_arguments", None, "max_calls"
    ]
    assert trips == [4]  # the four calls that reached the reservation step, in one trip
