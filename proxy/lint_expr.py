"""`callgate check`: CEL rules and cost expressions type-checked over their syntax tree.

Part of `proxy.lint` (which re-exports `check_expression`): the tree comes from
`proxy.cel.parser`, and a value's type is inferred from the tool's `arguments_schema` where one
is given. Expressions outside the parser's subset are skipped, not guessed at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.cel.parser import Parser, Unsupported, tokenize

VARIABLES = frozenset(("args", "tool", "principal", "request"))
REQUEST_FIELDS = {"model": "string", "metadata": "map", "user": "string"}
STRING_METHODS = frozenset(
    ("contains", "startsWith", "endsWith", "matches", "lowerAscii", "upperAscii", "trim")
)
_JSON_TYPES = {
    "string": "string",
    "integer": "number",
    "number": "number",
    "boolean": "bool",
    "array": "list",
    "object": "map",
    "null": "null",
}

# A type is a JSON Schema fragment (dict) for what the schema describes, or a tag: "string",
# "number", "bool", "list", "map", "null", or None for "unknown" (never reported).
Type = dict[str, Any] | str | None


def _tag(t: Type) -> str | None:
    """The kind of value a type stands for, when it is one kind."""
    if isinstance(t, str):
        return t
    if isinstance(t, dict):
        kind = t.get("type")
        if isinstance(kind, str):
            return _JSON_TYPES.get(kind)
        if isinstance(kind, list):
            kinds = {_JSON_TYPES.get(k) for k in kind if k != "null"}
            return kinds.pop() if len(kinds) == 1 else None
        if "properties" in t:
            return "map"
        if t.get("enum"):
            kinds = {_value_tag(v) for v in t["enum"]}
            return kinds.pop() if len(kinds) == 1 else None
    return None


def _value_tag(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    return "list" if isinstance(v, list) else "map" if isinstance(v, dict) else None


class _Checker:
    """Walks one expression's tree, inferring types and reporting what cannot work."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self.schema = schema
        self.problems: list[tuple[str, str, str]] = []  # (severity, code, message)

    def report(self, severity: str, code: str, message: str) -> None:
        if (severity, code, message) not in self.problems:
            self.problems.append((severity, code, message))

    def field(self, t: Type, name: str, path: str, soft: bool = False) -> Type:
        if not isinstance(t, dict):
            return None
        props = t.get("properties")
        if not isinstance(props, dict) or _tag(t) != "map":
            return None
        if name in props:
            return props[name] if isinstance(props[name], dict) else None
        extra = t.get("additionalProperties", True)
        closed = extra is False
        if closed and path == "request":
            known = ", ".join(REQUEST_FIELDS)
            self.report(
                "warning" if soft else "error",
                "unknown-field",
                f"`request.{name}`: the request facts are {known}; reading another fails "
                "every call",
            )
        elif closed:
            self.report(
                "warning" if soft else "error",
                "unknown-field",
                f"`{path}.{name}`: the arguments schema does not allow a field {name!r} "
                "(additionalProperties: false), so "
                + ("this is always false" if soft else "reading it fails every call"),
            )
        elif "patternProperties" not in t:
            known = ", ".join(sorted(props)) or "none"
            self.report(
                "warning",
                "unknown-field",
                f"`{path}.{name}`: the arguments schema has no field {name!r} (it has: {known})",
            )
        return extra if isinstance(extra, dict) else None

    def walk(self, node: Any, scope: dict[str, Type], path: str = "") -> Type:
        # One method per node kind, found in a table: a new kind is a method and an entry.
        walker = _WALKERS.get(node[0])
        return walker(self, node, scope) if walker is not None else None

    def lit(self, node: Any, scope: dict[str, Type]) -> Type:
        return _value_tag(node[1])

    def var(self, node: Any, scope: dict[str, Type]) -> Type:
        name = node[1]
        if name in scope:
            return scope[name]
        if name not in VARIABLES:
            self.report(
                "error",
                "unknown-variable",
                f"unknown variable {name!r}: rules see args, tool, principal, request",
            )
            return None
        if name == "args":
            return self.schema if self.schema is not None else None
        if name in ("tool", "principal"):
            return "string"
        return _REQUEST_TYPE

    def member(self, node: Any, scope: dict[str, Type]) -> Type:
        target = self.walk(node[1], scope)
        return self.field(target, node[2], _render(node[1]))

    def has(self, node: Any, scope: dict[str, Type]) -> Type:
        # has() on a field the schema lacks is only ever false: a warning, never an error.
        self.field(self.walk(node[1], scope), node[2], _render(node[1]), soft=True)
        return "bool"

    def index(self, node: Any, scope: dict[str, Type]) -> Type:
        target = self.walk(node[1], scope)
        key = node[2]
        self.walk(key, scope)
        if key[0] == "lit" and isinstance(key[1], str):
            return self.field(target, key[1], _render(node[1]))
        if isinstance(target, dict) and _tag(target) == "list":
            items = target.get("items")
            return items if isinstance(items, dict) else None
        return None

    def logical(self, node: Any, scope: dict[str, Type]) -> Type:
        for side in node[1:]:
            if _tag(self.walk(side, scope)) not in (None, "bool"):
                self.report("error", "type", f"`{_render(side)}` is not a bool ({node[0]})")
        return "bool"

    def negation(self, node: Any, scope: dict[str, Type]) -> Type:
        self.walk(node[1], scope)
        return "bool"

    def minus(self, node: Any, scope: dict[str, Type]) -> Type:
        return self.walk(node[1], scope)

    def cond(self, node: Any, scope: dict[str, Type]) -> Type:
        self.walk(node[1], scope)
        yes, no = self.walk(node[2], scope), self.walk(node[3], scope)
        return yes if _tag(yes) == _tag(no) else None

    def macro(self, node: Any, scope: dict[str, Type]) -> Type:
        _, name, target, var, body = node
        t = self.walk(target, scope)
        item: Type = None
        if isinstance(t, dict) and _tag(t) == "list" and isinstance(t.get("items"), dict):
            item = t["items"]
        self.walk(body, {**scope, var: item})
        return "bool" if name in ("exists", "all", "exists_one") else "list"

    def list_literal(self, node: Any, scope: dict[str, Type]) -> Type:
        for item_node in node[1]:
            self.walk(item_node, scope)
        return "list"

    def map_literal(self, node: Any, scope: dict[str, Type]) -> Type:
        for k, v in node[1]:
            self.walk(k, scope)
            self.walk(v, scope)
        return "map"

    def binary(self, node: Any, scope: dict[str, Type]) -> Type:
        _, op, left, right = node
        lt, rt = _tag(self.walk(left, scope)), _tag(self.walk(right, scope))
        pair = f"`{_render(left)}` ({lt}) {op} `{_render(right)}` ({rt})"
        mixed = lt is not None and rt is not None and lt != rt and "null" not in (lt, rt)
        if op == "in":
            if rt not in (None, "list", "map"):
                self.report("error", "type", f"{pair}: `in` needs a list or map on the right")
            return "bool"
        if op in ("<", "<=", ">", ">="):
            if mixed:
                self.report(
                    "error",
                    "type",
                    f"{pair}: no ordering between {lt} and {rt}; "
                    "the rule errors on every call that reaches it",
                )
            return "bool"
        if op in ("==", "!="):
            if mixed:
                always = "false" if op == "==" else "true"
                self.report(
                    "warning",
                    "type",
                    f"{pair}: a {lt} never equals a {rt}, so this is always {always}",
                )
            return "bool"
        if mixed:
            self.report("error", "type", f"{pair}: CEL does not convert between types")
            return None
        return lt if lt == rt else None

    def call(self, node: Any, scope: dict[str, Type]) -> Type:
        _, name, target, args = node
        t = self.walk(target, scope) if target is not None else None
        for a in args:
            self.walk(a, scope)
        if target is not None and name in STRING_METHODS:
            tag = _tag(t)
            if tag is not None and tag != "string":
                self.report(
                    "error",
                    "type",
                    f"`{_render(target)}` is a {tag}, and .{name}() is a string method",
                )
            return "string" if name in ("lowerAscii", "upperAscii", "trim") else "bool"
        if name == "size":
            return "number"
        if name in ("int", "uint", "double"):
            return "number"
        if name == "string":
            return "string"
        return None


_Walker = Callable[[_Checker, Any, dict[str, Type]], Type]
_WALKERS: dict[str, _Walker] = {
    "lit": _Checker.lit,
    "var": _Checker.var,
    "member": _Checker.member,
    "has": _Checker.has,
    "index": _Checker.index,
    "and": _Checker.logical,
    "or": _Checker.logical,
    "not": _Checker.negation,
    "neg": _Checker.minus,
    "cond": _Checker.cond,
    "bin": _Checker.binary,
    "call": _Checker.call,
    "macro": _Checker.macro,
    "list": _Checker.list_literal,
    "map": _Checker.map_literal,
}
# What `request` is to a rule: a closed object of the request facts.
_REQUEST_TYPE: dict[str, Any] = {
    "type": "object",
    "properties": {k: {"type": v if v != "map" else "object"} for k, v in REQUEST_FIELDS.items()},
    "additionalProperties": False,
}


def _render(node: Any) -> str:
    """A short source-like text of a node, for messages."""
    kind = node[0]
    if kind == "var":
        return str(node[1])
    if kind == "lit":
        return repr(node[1]) if not isinstance(node[1], str) else f'"{node[1]}"'
    if kind == "member":
        return f"{_render(node[1])}.{node[2]}"
    if kind == "index":
        return f"{_render(node[1])}[{_render(node[2])}]"
    if kind == "call":
        target = f"{_render(node[2])}." if node[2] is not None else ""
        return f"{target}{node[1]}(...)"
    return "..."


def check_expression(source: str, schema: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    try:
        tree = Parser(tokenize(source)).parse()
    except (Unsupported, RecursionError):
        return []  # outside the subset: not guessed at
    checker = _Checker(schema)
    checker.walk(tree, {})
    return checker.problems
