"""The rules gate: allow/deny, argument parsing, JSON Schema, and CEL expressions.

Stateless, so it runs first and a rule block consumes no rate-limit slot or budget.
A rule that raises blocks: a policy that cannot be evaluated fails closed.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.gates.decision import Block
from proxy.policy import Rule, ToolPolicy
from proxy.toolcalls import CallContext, ToolCall

GATE = "rules"
# Deeper arguments are blocked unread: every later step (CEL, JSON Schema, redaction, the audit
# record, the log line) walks them, and orjson serializes at most 254 levels. No real tool's
# arguments come near this; an attacker's do.
MAX_ARGUMENT_DEPTH = 100


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
    if isinstance(args, _CONTAINERS) and nesting_exceeds(args, MAX_ARGUMENT_DEPTH):
        return None, Block(
            GATE,
            "invalid_arguments",
            f"Invalid arguments: nested deeper than {MAX_ARGUMENT_DEPTH} levels",
        )
    return args, None


_CONTAINERS = (dict, list)
_SCALARS = frozenset((str, int, float, bool, type(None)))


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


def check_rules(tool: ToolPolicy, call: ToolCall, args: Any, ctx: CallContext) -> Block | None:
    if not tool.allow:
        return Block(
            GATE, "tool_not_allowed", f"Policy violation: tool {call.name!r} is not allowed"
        )
    if tool.schema is not None and not _schema_passes(tool, args):
        try:
            error = next(iter(tool.schema.iter_errors(args)), None)
        except Exception as exc:  # e.g. an unresolvable $ref: the check cannot pass
            return Block(GATE, "rule_error", f"Invalid arguments (schema error: {exc})")
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" at {where}" if where else ""
            return Block(GATE, "invalid_arguments", f"Invalid arguments{at}: {error.message}")
    if not tool.rules:
        return None
    env = {
        "args": args,
        "tool": call.name,
        "principal": ctx.principal,
        "request": ctx.request_vars,  # built only for rules that read it
    }
    for rule in tool.rules:
        try:
            result = rule.program.run(env)
        except Exception as exc:  # missing field, type error, ...: fail closed
            return Block(GATE, "rule_error", f"{_label(rule)} (rule error: {exc})")
        if result is rule.deny:
            label = _label(rule)
            return Block(GATE, "rule", f"{label}: {rule.message}" if rule.message else label)
        if not isinstance(result, bool):
            return Block(
                GATE, "rule_error", f"{_label(rule)} (rule returned {type(result).__name__})"
            )
    return None


def _schema_passes(tool: ToolPolicy, args: Any) -> bool:
    """The compiled check's verdict when it has one; otherwise jsonschema decides (and words)."""
    if tool.schema_check is None:
        return False
    try:
        return tool.schema_check(args)
    except Exception:  # e.g. arguments nested deeper than the compiled check can follow
        return False


def _label(rule: Rule) -> str:
    return f"Policy violation: {rule.name}"
