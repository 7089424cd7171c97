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


def parse_arguments(call: ToolCall) -> tuple[Any, Block | None]:
    if call.kind == "custom":
        return {"input": call.arguments}, None
    text = call.arguments.strip()
    if not text:
        return {}, None  # some servers send "" for a call without parameters
    try:
        return orjson.loads(text), None
    except orjson.JSONDecodeError as exc:
        return None, Block(GATE, "invalid_arguments", f"Invalid arguments: not valid JSON ({exc})")


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
