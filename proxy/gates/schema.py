"""The arguments schema: a tool's `arguments_schema` (JSON Schema) checked before its rules.

The compiled check (when the schema has one) answers valid or not; jsonschema runs only to
word the error of arguments already known to be invalid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.gates.decision import Block, Decision
from proxy.toolcalls import CallContext


@dataclass(frozen=True, slots=True)
class Schema:
    enforce: bool
    validator: Any  # jsonschema.protocols.Validator
    fast_check: Callable[[Any], bool] | None
    name: str = "rules"
    kind: str = "schema"
    needs_args: bool = True

    def check(self, decision: Decision, ctx: CallContext) -> Block | None:
        args = decision.args
        if self._passes(args):
            return None
        try:
            error = next(iter(self.validator.iter_errors(args)), None)
        except Exception as exc:  # e.g. an unresolvable $ref: the check cannot pass
            return Block(self.name, "rule_error", f"Invalid arguments (schema error: {exc})")
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        at = f" at {where}" if where else ""
        return Block(self.name, "invalid_arguments", f"Invalid arguments{at}: {error.message}")

    def _passes(self, args: Any) -> bool:
        """The compiled check's verdict when it has one; otherwise jsonschema decides."""
        if self.fast_check is None:
            return False
        try:
            return self.fast_check(args)
        except Exception:  # e.g. arguments nested deeper than the compiled check can follow
            return False

    def describe(self) -> str:
        return ""  # the rules step says "schema" (explain's wording predates the split)


def build(tool: Any) -> Schema | None:
    if tool.schema is None:
        return None
    return Schema(tool.rules_mode == "enforce", tool.schema, tool.schema_check)
