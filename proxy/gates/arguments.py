"""The arguments step: a call's arguments read as JSON, once, for every later step.

Arguments that are not JSON, or nested deeper than `MAX_ARGUMENT_DEPTH`, are blocked unread
(as `rules` / `invalid_arguments`): every later step (CEL, JSON Schema, redaction, the audit
record, the log line) walks them, and orjson serializes at most 254 levels. No real tool's
arguments come near this depth; an attacker's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.gates.decision import Block, Decision
from proxy.toolcalls import CallContext, ToolCall

GATE = "rules"
MAX_ARGUMENT_DEPTH = 100
_SCALARS = frozenset((str, int, float, bool, type(None)))


def parse_arguments(call: ToolCall) -> tuple[Any, Block | None]:
    if call.kind == "custom":
        return {"input": call.arguments}, None
    text = call.arguments.strip()
    if not text:
        return {}, None  # some servers send "" for a call without parameters
    try:
        args = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, Block(GATE, "invalid_arguments", f"Invalid arguments: not valid JSON ({exc})")
    if isinstance(args, dict | list) and nesting_exceeds(args, MAX_ARGUMENT_DEPTH):
        return None, Block(
            GATE,
            "invalid_arguments",
            f"Invalid arguments: nested deeper than {MAX_ARGUMENT_DEPTH} levels",
        )
    return args, None


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` (parsed JSON) has containers nested more than `limit` deep.

    Iterative: the point is to judge values too deep for the recursive walks that come later.
    """
    # The usual arguments, a flat object of scalars, without the walk.
    if type(value) is dict and _SCALARS.issuperset(map(type, value.values())):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        for child in children:
            if type(child) is dict or type(child) is list:
                push((child, depth + 1))
    return False


@dataclass(frozen=True, slots=True)
class Arguments:
    enforce: bool
    name: str = GATE
    kind: str = "arguments"
    needs_args: bool = False

    def check(self, decision: Decision, ctx: CallContext) -> Block | None:
        decision.args, block = parse_arguments(decision.call)
        if block is not None:
            decision.unread = True
        return block

    def describe(self) -> str:
        return ""


def build(tool: Any) -> Arguments:
    return Arguments(tool.rules_mode == "enforce")
