"""Fast validity-only checks that agree exactly with `jsonschema` on a subset of JSON Schema.

`compile_check(schema)` returns a function `f(instance) -> bool` such that `f(instance)` is True
exactly when `validator_for(schema)(schema).iter_errors(instance)` yields nothing, or None when
the schema uses something outside the subset (the caller then uses jsonschema alone, and always
uses jsonschema to word the error).

Exactness is defined for instances that are JSON values as `orjson.loads`/`json.loads` build
them (dict, list, str, int, float, bool, None), and for a validator built as `cls(schema)`, i.e.
without a format checker, which is how jsonschema ignores `format`.

How: each keyword function jsonschema would run is identified by identity (`cls.VALIDATORS[k]`)
and translated into Python source mirroring that function's code; the source for a whole schema
is compiled once. Keyword functions we do not mirror (`$ref`, `unevaluated*`, ...) make the whole
schema unsupported, so a new jsonschema release that swaps a keyword's implementation degrades
to None rather than to a wrong answer. Helpers whose quirks matter (`equal` for enum/const,
`uniq` for uniqueItems) are jsonschema's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import islice
from typing import Any

from jsonschema import validators as _validators

try:
    from jsonschema import _keywords as _kw
    from jsonschema import _legacy_keywords as _lkw
    from jsonschema import _types
    from jsonschema._utils import equal as _equal
    from jsonschema._utils import uniq as _uniq
except ImportError:  # private modules moved: we can no longer prove agreement, so never claim it
    _kw = None

# Placeholder for "the instance" in generated code: repr() escapes NUL, so no literal contains it.
_V = "\x00"
# Nesting of generated blocks per function; deeper subschemas become calls. CPython refuses more
# than 20 nested loops in one function and 100 indentation levels.
_MAX_DEPTH = 10
# A subschema used as a boolean (anyOf, not, ...) is inlined when its expression is this short.
_MAX_INLINE_EXPR = 240
# Guards against YAML anchors multiplying a small schema into a huge program.
_MAX_NODES = 20_000

_TYPE_NAMES = frozenset({"array", "boolean", "integer", "null", "number", "object", "string"})
_GROUP_OF_TYPE = {
    "object": "object",
    "array": "array",
    "string": "string",
    "number": "number",
    "integer": "number",
    "null": "null",
    "boolean": "boolean",
}
_ALL_GROUPS = frozenset(_GROUP_OF_TYPE.values())
# Guards mirror each keyword's `validator.is_type(instance, ...)` early return.
_GUARDS = {
    "object": "isinstance({v}, dict)",
    "array": "isinstance({v}, list)",
    "string": "isinstance({v}, str)",
    "number": "(isinstance({v}, (int, float)) and type({v}) is not bool)",
}
_TYPE_EXPR = {
    "object": "isinstance({v}, dict)",
    "array": "isinstance({v}, list)",
    "string": "isinstance({v}, str)",
    "null": "{v} is None",
    "boolean": "isinstance({v}, bool)",
    "number": "(isinstance({v}, (int, float)) and type({v}) is not bool)",
}
# jsonschema's draft 6+ type checker counts 1.0 as an integer; draft 4's does not.
_INTEGER_EXPR = {
    False: "(isinstance({v}, int) and type({v}) is not bool)",
    True: "(isinstance({v}, int) and type({v}) is not bool"
    " or isinstance({v}, float) and {v}.is_integer())",
}


class _Unsupported(Exception):
    """The schema needs something this module does not mirror exactly."""


# A compiled schema is a list of checks, all of which must hold, with _V standing for the instance.
@dataclass(slots=True)
class _Expr:
    cond: str  # a bool-valued expression


@dataclass(slots=True)
class _Stmt:
    line: str


@dataclass(slots=True)
class _If:
    cond: str
    body: list[_Check]
    orelse: list[_Check] = field(default_factory=list)


@dataclass(slots=True)
class _For:
    header: str
    body: list[_Check]
    orelse: list[_Check] = field(default_factory=list)


_Check = _Expr | _Stmt | _If | _For


def _float_multiple_fails(instance: float, db: float) -> bool:
    # Verbatim from jsonschema's multipleOf for a float divisor: 0.3 is not a multiple of 0.1.
    quotient = instance / db
    try:
        return int(quotient) != quotient
    except OverflowError:
        return (Fraction(instance) / Fraction(db)).denominator != 1


def _equal_any(candidates: tuple[Any, ...], instance: Any) -> bool:
    for candidate in candidates:
        if _equal(candidate, instance):
            return True
    return False


def _subst(checks: list[_Check], var: str) -> list[_Check]:
    out: list[_Check] = []
    for c in checks:
        if isinstance(c, _Expr):
            out.append(_Expr(c.cond.replace(_V, var)))
        elif isinstance(c, _Stmt):
            out.append(_Stmt(c.line.replace(_V, var)))
        elif isinstance(c, _If):
            out.append(_If(c.cond.replace(_V, var), _subst(c.body, var), _subst(c.orelse, var)))
        else:
            out.append(_For(c.header.replace(_V, var), _subst(c.body, var), _subst(c.orelse, var)))
    return out


def _size(checks: list[_Check]) -> int:
    return sum(
        1 + _size(c.body) + _size(c.orelse) if isinstance(c, _If | _For) else 1 for c in checks
    )


def _depth(checks: list[_Check]) -> int:
    return max(
        (1 + max(_depth(c.body), _depth(c.orelse)) if isinstance(c, _If | _For) else 0)
        for c in [*checks, _Stmt("")]
    )


def _to_expr(checks: list[_Check]) -> str | None:
    """The checks as one expression, or None when they need statements."""
    parts = []
    for c in checks:
        if isinstance(c, _Expr):
            e = c.cond
        elif isinstance(c, _If):
            body, orelse = _to_expr(c.body), _to_expr(c.orelse)
            if body is None or orelse is None:
                return None
            if orelse == "True":
                e = "True" if body == "True" else f"not ({c.cond}) or ({body})"
            else:
                e = f"({body}) if ({c.cond}) else ({orelse})"
        else:
            return None
        if e == "False":
            return "False"  # checks are pure, so one that cannot hold decides the conjunction
        if e != "True":
            parts.append(e)
    if not parts:
        return "True"
    return parts[0] if len(parts) == 1 else " and ".join(f"({p})" for p in parts)


def _render(checks: list[_Check], indent: int, out: list[str]) -> None:
    pad = "    " * indent
    for c in checks:
        if isinstance(c, _Expr):
            if c.cond == "False":
                out.append(f"{pad}return False")
            elif c.cond != "True":
                out.append(f"{pad}if not ({c.cond}): return False")
        elif isinstance(c, _Stmt):
            out.append(pad + c.line)
        else:
            head = f"if {c.cond}:" if isinstance(c, _If) else f"{c.header}:"
            out.append(pad + head)
            _render_block(c.body, indent + 1, out)
            if c.orelse:
                out.append(f"{pad}else:")
                _render_block(c.orelse, indent + 1, out)


def _render_block(checks: list[_Check], indent: int, out: list[str]) -> None:
    before = len(out)
    _render(checks, indent, out)
    if len(out) == before:
        out.append("    " * indent + "pass")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float):
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


@dataclass(slots=True)
class _Node:
    """The schema object being compiled, for keyword handlers that read sibling keywords."""

    gen: _Gen
    schema: dict[str, Any]
    cls: type


class _Gen:
    def __init__(self) -> None:
        self.ns: dict[str, Any] = {
            "_islice": islice,
            "_uniq": _uniq,
            "_equal_any": _equal_any,
            "_mulf": _float_multiple_fails,
        }
        self.sources: list[str] = []
        self.counter = 0
        self.nodes = 0
        self.templates: dict[tuple[int, type], tuple[list[_Check], int, str | None]] = {}
        self.functions: dict[tuple[int, type], str] = {}
        self.keep: list[Any] = []  # keeps memo keys' objects alive so id() stays unique

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, value: Any) -> str:
        name = self.fresh("_k")
        self.ns[name] = value
        return name

    def lit(self, value: Any) -> str:
        # repr() of these is a literal for an equal value of the same type; not so for inf/nan.
        finite_float = isinstance(value, float) and value - value == 0
        if value is None or isinstance(value, str | int) or finite_float:
            return repr(value)
        return self.const(value)

    def regex(self, pattern: Any) -> str:
        # jsonschema calls re.search(pattern, s) == re.compile(pattern).search(s), flags 0.
        if not isinstance(pattern, str):
            raise _Unsupported("pattern")
        return self.const(re.compile(pattern))

    def spend(self, n: int) -> None:
        self.nodes += n
        if self.nodes > _MAX_NODES:
            raise _Unsupported("too large")

    def template(self, schema: Any, parent: type) -> tuple[list[_Check], int, str | None]:
        """Checks for `schema` (as _V), their block depth, and their single-expression form."""
        key = (id(schema), parent)
        if key not in self.templates:
            checks = _schema_checks(self, schema, parent)
            self.spend(_size(checks))
            self.templates[key] = (checks, _depth(checks), _to_expr(checks))
            self.keep.append(schema)
        return self.templates[key]

    def function(self, schema: Any, parent: type) -> str:
        key = (id(schema), parent)
        if key not in self.functions:
            name = self.functions[key] = self.fresh("_f")
            checks, _, expr = self.template(schema, parent)
            lines = [f"def {name}(x):"]
            if expr is not None:
                lines.append(f"    return {expr}")
            else:
                _render(checks, 1, lines)
                lines.append("    return True")
            self.sources.append("\n".join(lines).replace(_V, "x"))
        return self.functions[key]

    def inline(self, schema: Any, parent: type, var: str, extra: int) -> list[_Check]:
        """Checks for `schema` on `var`, to be nested `extra` blocks deeper than the caller."""
        if schema is True:
            return []
        if schema is False:
            return [_Expr("False")]
        checks, depth, _ = self.template(schema, parent)
        if not checks:
            return []
        if 1 + extra + depth > _MAX_DEPTH:
            return [_Expr(f"{self.function(schema, parent)}({var})")]
        self.spend(_size(checks))
        return _subst(checks, var)

    def inline_item(self, schema: Any, parent: type, item: str, extra: int) -> list[_Check]:
        """Checks for a member `item` (e.g. `_V['a']`) of _V: reread when cheap, else bound."""
        checks = self.inline(schema, parent, _V, extra)
        expr = _to_expr(checks)
        if expr is not None and expr.count(_V) <= 2:
            return [_Expr(expr.replace(_V, item))] if expr != "True" else []
        name = self.fresh("y")
        return [_Stmt(f"{name} = {item}"), *_subst(checks, name)]

    def predicate(self, schema: Any, parent: type, var: str) -> str:
        """A bool expression: is `var` valid under `schema`?"""
        if schema is True or schema is False:
            return repr(schema)
        _, _, expr = self.template(schema, parent)
        if expr in ("True", "False"):
            return expr
        if expr is not None and len(expr) <= _MAX_INLINE_EXPR:
            return f"({expr.replace(_V, var)})"
        return f"{self.function(schema, parent)}({var})"


def _dialect(schema: dict[str, Any], parent: type) -> type:
    # jsonschema's descend() evolves the validator, and evolve() re-runs validator_for with the
    # parent class as default: a nested `$schema` switches dialect for that subtree.
    if "$schema" in schema:
        if not isinstance(schema["$schema"], str):
            raise _Unsupported("$schema")
        try:
            cls = _validators.validator_for(schema, default=parent)
        except Exception as exc:  # URI normalisation can raise on odd strings
            raise _Unsupported("$schema") from exc
    else:
        cls = parent
    if cls not in _INTEGER_ACCEPTS_FLOAT:
        raise _Unsupported(f"dialect {cls.__name__}")
    return cls


def _schema_checks(gen: _Gen, schema: Any, parent: type) -> list[_Check]:
    if schema is True:
        return []
    if schema is False:
        return [_Expr("False")]
    if not isinstance(schema, dict):
        raise _Unsupported("schema is not an object or boolean")
    cls = _dialect(schema, parent)
    node = _Node(gen, schema, cls)
    checks: list[_Check] = []
    possible = _ALL_GROUPS
    if "type" in schema and cls.VALIDATORS.get("type") is _kw.type:
        expr, possible = _type_check(schema["type"], _INTEGER_ACCEPTS_FLOAT[cls])
        checks.append(_Expr(expr))  # first, so that narrowed group checks run only on that type
    groups: dict[str | None, list[_Check]] = {}
    for key, value in schema.items():
        fn = cls.VALIDATORS.get(key)
        if fn is None or fn is _kw.type:
            continue  # jsonschema ignores keywords its dialect does not implement
        handler = _HANDLERS.get(fn)
        if handler is None:
            raise _Unsupported(key)
        group, found = handler(node, value)
        groups.setdefault(group, []).extend(found)
    checks.extend(groups.pop(None, []))
    for group, found in groups.items():
        if not found or group not in possible:
            continue
        if possible == {group}:
            checks.extend(found)
        else:
            checks.append(_If(_GUARDS[group].format(v=_V), found))
    return checks


def _type_check(types: Any, integer_accepts_float: bool) -> tuple[str, frozenset[str]]:
    names = [types] if isinstance(types, str) else types
    # An unknown name makes jsonschema raise UndefinedTypeCheck, but only once reached.
    if not isinstance(names, list) or not all(type(n) is str and n in _TYPE_NAMES for n in names):
        raise _Unsupported("type")
    unique = set(names)
    if "number" in unique:
        unique.discard("integer")  # every integer is a number in both type checkers
    if not unique:
        return "False", frozenset()
    parts = [
        (_INTEGER_EXPR[integer_accepts_float] if n == "integer" else _TYPE_EXPR[n]).format(v=_V)
        for n in sorted(unique)
    ]
    expr = parts[0] if len(parts) == 1 else " or ".join(f"({p})" for p in parts)
    return expr, frozenset(_GROUP_OF_TYPE[n] for n in unique)


# Keyword handlers: (node, keyword value) -> (group or None for any type, checks).
_Result = tuple[str | None, list[_Check]]


def _number_arg(value: Any) -> Any:
    if not _is_number(value):
        raise _Unsupported("numeric keyword")
    return value


def _schema_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _Unsupported("expected a list of schemas")
    return value


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _Unsupported("expected a list of strings")
    return value


def _str_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Unsupported("expected an object")
    return value


def _h_noop(node: _Node, value: Any) -> _Result:
    # `format`: a validator built without a format checker never reports format errors.
    return None, []


def _enum_expr(gen: _Gen, values: list[Any]) -> str:
    """`instance` equals some value under jsonschema's `equal` (True != 1, 1 == 1.0)."""
    if not all(_is_json(v) for v in values):
        raise _Unsupported("enum value")
    strs = [v for v in values if isinstance(v, str)]
    nums = [v for v in values if _is_number(v)]
    parts = []
    if len(strs) == 1:
        parts.append(f"{_V} == {gen.lit(strs[0])}")
    elif strs:
        parts.append(f"(isinstance({_V}, str) and {_V} in {gen.const(frozenset(strs))})")
    if len(nums) == 1:
        parts.append(f"({_V} == {gen.lit(nums[0])} and type({_V}) is not bool)")
    elif nums:
        parts.append(f"({_GUARDS['number'].format(v=_V)} and {_V} in {gen.const(frozenset(nums))})")
    for singleton in (True, False, None):
        if any(v is singleton for v in values):
            parts.append(f"{_V} is {singleton}")
    containers = tuple(v for v in values if isinstance(v, list | dict))
    if containers:
        candidates = gen.const(containers)
        parts.append(f"(isinstance({_V}, (list, dict)) and _equal_any({candidates}, {_V}))")
    return " or ".join(f"({p})" for p in parts) if parts else "False"


def _h_enum(node: _Node, value: Any) -> _Result:
    if not isinstance(value, list):
        raise _Unsupported("enum")  # jsonschema would iterate a dict's keys or a string's chars
    return None, [_Expr(_enum_expr(node.gen, value))]


def _h_const(node: _Node, value: Any) -> _Result:
    return None, [_Expr(_enum_expr(node.gen, [value]))]


def _h_all_of(node: _Node, value: Any) -> _Result:
    checks: list[_Check] = []
    for sub in _schema_list(value):
        checks.extend(node.gen.inline(sub, node.cls, _V, 0))
    return None, checks


def _h_any_of(node: _Node, value: Any) -> _Result:
    preds = [node.gen.predicate(sub, node.cls, _V) for sub in _schema_list(value)]
    if "True" in preds:
        return None, []
    return None, [_Expr(" or ".join(preds) if preds else "False")]


def _h_one_of(node: _Node, value: Any) -> _Result:
    preds = [node.gen.predicate(sub, node.cls, _V) for sub in _schema_list(value)]
    if not preds:
        return None, [_Expr("False")]
    # All branches are evaluated, as jsonschema does; bools sum to the number that matched.
    return None, [_Expr(preds[0] if len(preds) == 1 else f"{' + '.join(preds)} == 1")]


def _h_not(node: _Node, value: Any) -> _Result:
    return None, [_Expr(f"not {node.gen.predicate(value, node.cls, _V)}")]


def _h_if(node: _Node, value: Any) -> _Result:
    gen, schema = node.gen, node.schema
    cond = gen.predicate(value, node.cls, _V)
    then = gen.inline(schema["then"], node.cls, _V, 1) if "then" in schema else []
    orelse = gen.inline(schema["else"], node.cls, _V, 1) if "else" in schema else []
    if not then and not orelse:
        return None, []
    return None, [_If(cond, then, orelse)]


def _h_required(node: _Node, value: Any) -> _Result:
    keys = _str_list(value)
    if len(keys) > 3:
        return "object", [_Expr(f"{_V}.keys() >= {node.gen.const(frozenset(keys))}")]
    return "object", [_Expr(f"{node.gen.lit(k)} in {_V}") for k in keys]


def _h_properties(node: _Node, value: Any) -> _Result:
    checks: list[_Check] = []
    for key, sub in _str_dict(value).items():
        k = node.gen.lit(key)
        body = node.gen.inline_item(sub, node.cls, f"{_V}[{k}]", 2)
        if body:
            checks.append(_If(f"{k} in {_V}", body))
    return "object", checks


def _extra_key_cond(node: _Node, key: str) -> tuple[str | None, str | None]:
    """Mirrors find_additional_properties: (not in `properties`, not matched by the regex)."""
    gen, schema = node.gen, node.schema
    properties = _str_dict(schema.get("properties", {}))
    # jsonschema joins all patterns with "|" here (not per pattern); "" joins to "" = no filter.
    joined = "|".join(_str_dict(schema.get("patternProperties", {})))
    declared = f"{key} not in {gen.const(frozenset(properties))}" if properties else None
    matched = f"{gen.regex(joined)}.search({key}) is None" if joined else None
    return declared, matched


def _h_additional_properties(node: _Node, value: Any) -> _Result:
    gen = node.gen
    key, item = gen.fresh("k"), gen.fresh("y")
    declared, matched = _extra_key_cond(node, key)
    cond = " and ".join(c for c in (declared, matched) if c) or None
    if value is True:
        return "object", []
    if value is False:
        if matched is None:
            names = gen.const(frozenset(node.schema.get("properties", {})))
            return "object", [_Expr(f"{_V}.keys() <= {names}" if declared else f"not {_V}")]
        return "object", [_For(f"for {key} in {_V}", [_If(cond, [_Expr("False")])])]
    if not isinstance(value, dict):
        raise _Unsupported("additionalProperties")
    body = gen.inline(value, node.cls, item, 3)
    if not body:
        return "object", []
    if cond is not None:
        body = [_If(cond, body)]
    return "object", [_For(f"for {key}, {item} in {_V}.items()", body)]


def _h_pattern_properties(node: _Node, value: Any) -> _Result:
    gen = node.gen
    key, item = gen.fresh("k"), gen.fresh("y")
    body: list[_Check] = []
    for pattern, sub in _str_dict(value).items():
        regex = gen.regex(pattern)
        checks = gen.inline(sub, node.cls, item, 3)
        if checks:
            body.append(_If(f"{regex}.search({key}) is not None", checks))
    return "object", [_For(f"for {key}, {item} in {_V}.items()", body)] if body else []


def _h_property_names(node: _Node, value: Any) -> _Result:
    key = node.gen.fresh("k")
    body = node.gen.inline(value, node.cls, key, 2)
    return "object", [_For(f"for {key} in {_V}", body)] if body else []


def _h_min_properties(node: _Node, value: Any) -> _Result:
    return "object", [_Expr(f"not len({_V}) < {node.gen.lit(_number_arg(value))}")]


def _h_max_properties(node: _Node, value: Any) -> _Result:
    return "object", [_Expr(f"not len({_V}) > {node.gen.lit(_number_arg(value))}")]


def _requires(node: _Node, key: str, deps: list[str]) -> list[_Check]:
    lit = node.gen.lit
    return [_If(f"{lit(key)} in {_V}", [_Expr(f"{lit(d)} in {_V}") for d in deps])] if deps else []


def _when_present(node: _Node, key: str, sub: Any) -> list[_Check]:
    body = node.gen.inline(sub, node.cls, _V, 2)
    return [_If(f"{node.gen.lit(key)} in {_V}", body)] if body else []


def _h_dependent_required(node: _Node, value: Any) -> _Result:
    checks: list[_Check] = []
    for key, deps in _str_dict(value).items():
        checks.extend(_requires(node, key, _str_list(deps)))
    return "object", checks


def _h_dependent_schemas(node: _Node, value: Any) -> _Result:
    checks: list[_Check] = []
    for key, sub in _str_dict(value).items():
        checks.extend(_when_present(node, key, sub))
    return "object", checks


def _h_dependencies(node: _Node, value: Any) -> _Result:
    # Draft 4-7 `dependencies`: an array lists required names; anything else is a schema.
    checks: list[_Check] = []
    for key, dep in _str_dict(value).items():
        if isinstance(dep, list):
            checks.extend(_requires(node, key, _str_list(dep)))
        else:
            checks.extend(_when_present(node, key, dep))
    return "object", checks


def _each_item(node: _Node, sub: Any, start: int) -> list[_Check]:
    item = node.gen.fresh("y")
    body = node.gen.inline(sub, node.cls, item, 2)
    if not body:
        return []
    source = _V if start == 0 else f"_islice({_V}, {start}, None)"
    return [_For(f"for {item} in {source}", body)]


def _positional(node: _Node, subs: list[Any]) -> list[_Check]:
    checks: list[_Check] = []
    for index, sub in enumerate(subs):
        body = node.gen.inline_item(sub, node.cls, f"{_V}[{index}]", 2)
        if body:
            checks.append(_If(f"len({_V}) > {index}", body))
    return checks


def _h_items(node: _Node, value: Any) -> _Result:
    # Draft 2020-12: `items` covers what `prefixItems` does not; `items: false` caps the length.
    prefix = len(_schema_list(node.schema.get("prefixItems", [])))
    if value is False:
        return "array", [_Expr(f"not len({_V}) > {prefix}")]
    if value is not True and not isinstance(value, dict):
        raise _Unsupported("items")
    return "array", _each_item(node, value, prefix)


def _h_prefix_items(node: _Node, value: Any) -> _Result:
    return "array", _positional(node, _schema_list(value))


def _h_items_draft6(node: _Node, value: Any) -> _Result:
    if isinstance(value, list):
        return "array", _positional(node, value)
    if value is False:
        return "array", [_Expr(f"not {_V}")]
    if value is not True and not isinstance(value, dict):
        raise _Unsupported("items")
    return "array", _each_item(node, value, 0)


def _h_items_draft4(node: _Node, value: Any) -> _Result:
    if isinstance(value, bool):
        raise _Unsupported("items")  # jsonschema zips over the bool and raises TypeError
    return _h_items_draft6(node, value)


def _h_additional_items(node: _Node, value: Any) -> _Result:
    items = node.schema.get("items", {})
    if isinstance(items, dict):
        return "array", []  # jsonschema returns early when `items` is absent or one schema
    if not isinstance(items, list):
        raise _Unsupported("additionalItems")  # len(bool) raises TypeError in jsonschema
    if value is False:
        return "array", [_Expr(f"not len({_V}) > {len(items)}")]
    if value is not True and not isinstance(value, dict):
        raise _Unsupported("additionalItems")
    return "array", _each_item(node, value, len(items))


def _h_min_items(node: _Node, value: Any) -> _Result:
    return "array", [_Expr(f"not len({_V}) < {node.gen.lit(_number_arg(value))}")]


def _h_max_items(node: _Node, value: Any) -> _Result:
    return "array", [_Expr(f"not len({_V}) > {node.gen.lit(_number_arg(value))}")]


def _h_unique_items(node: _Node, value: Any) -> _Result:
    if not isinstance(value, bool):
        raise _Unsupported("uniqueItems")
    # jsonschema's uniq itself: its sort-then-compare-neighbours pass has quirks worth keeping.
    return "array", [_Expr(f"_uniq({_V})")] if value else []


def _any_item(node: _Node, value: Any) -> list[_Check]:
    item = node.gen.fresh("y")
    pred = node.gen.predicate(value, node.cls, item)
    return [_For(f"for {item} in {_V}", [_If(pred, [_Stmt("break")])], [_Expr("False")])]


def _h_contains(node: _Node, value: Any) -> _Result:
    gen, schema = node.gen, node.schema
    low = _number_arg(schema.get("minContains", 1))
    high = _number_arg(schema["maxContains"]) if "maxContains" in schema else None
    if high is None and low == 1:
        return "array", _any_item(node, value)
    if high is None and not low > 0:
        node.gen.predicate(value, node.cls, _V)  # still reject an unsupported subschema
        return "array", []  # no count of matches is below the minimum
    item, count = gen.fresh("y"), gen.fresh("n")
    pred = gen.predicate(value, node.cls, item)
    checks: list[_Check] = [
        _Stmt(f"{count} = 0"),
        _For(f"for {item} in {_V}", [_If(pred, [_Stmt(f"{count} += 1")])]),
        _Expr(f"not {count} < {gen.lit(low)}"),
    ]
    if high is not None:
        # jsonschema stops at the first match beyond the maximum; counting on is equivalent.
        checks.append(_Expr(f"not {count} > {gen.lit(high)}"))
    return "array", checks


def _h_contains_draft6(node: _Node, value: Any) -> _Result:
    return "array", _any_item(node, value)


def _h_min_length(node: _Node, value: Any) -> _Result:
    # len(str) counts code points, as jsonschema does.
    return "string", [_Expr(f"not len({_V}) < {node.gen.lit(_number_arg(value))}")]


def _h_max_length(node: _Node, value: Any) -> _Result:
    return "string", [_Expr(f"not len({_V}) > {node.gen.lit(_number_arg(value))}")]


def _h_pattern(node: _Node, value: Any) -> _Result:
    return "string", [_Expr(f"{node.gen.regex(value)}.search({_V}) is not None")]


def _bound(node: _Node, value: Any, failing_op: str) -> _Result:
    # `not (x < m)` rather than `x >= m`, so that a NaN bound behaves as in jsonschema.
    return "number", [_Expr(f"not {_V} {failing_op} {node.gen.lit(_number_arg(value))}")]


def _h_minimum(node: _Node, value: Any) -> _Result:
    return _bound(node, value, "<")


def _h_maximum(node: _Node, value: Any) -> _Result:
    return _bound(node, value, ">")


def _h_exclusive_minimum(node: _Node, value: Any) -> _Result:
    return _bound(node, value, "<=")


def _h_exclusive_maximum(node: _Node, value: Any) -> _Result:
    return _bound(node, value, ">=")


def _h_minimum_draft4(node: _Node, value: Any) -> _Result:
    # Draft 4's boolean exclusiveMinimum is read by `minimum`, by truthiness.
    return _bound(node, value, "<=" if node.schema.get("exclusiveMinimum", False) else "<")


def _h_maximum_draft4(node: _Node, value: Any) -> _Result:
    return _bound(node, value, ">=" if node.schema.get("exclusiveMaximum", False) else ">")


def _h_multiple_of(node: _Node, value: Any) -> _Result:
    divisor = _number_arg(value)
    if divisor == 0 or divisor - divisor != 0:
        raise _Unsupported("multipleOf")  # zero or non-finite: jsonschema raises
    if isinstance(divisor, float):
        return "number", [_Expr(f"not _mulf({_V}, {node.gen.lit(divisor)})")]
    return "number", [_Expr(f"not {_V} % {divisor!r}")]


_Handler = Callable[[_Node, Any], _Result]
_HANDLERS: dict[Callable[..., Any], _Handler] = {}
_INTEGER_ACCEPTS_FLOAT: dict[type, bool] = {}

if _kw is not None:
    _HANDLERS = {
        _kw.format: _h_noop,
        _kw.enum: _h_enum,
        _kw.const: _h_const,
        _kw.allOf: _h_all_of,
        _kw.anyOf: _h_any_of,
        _kw.oneOf: _h_one_of,
        _kw.not_: _h_not,
        _kw.if_: _h_if,
        _kw.required: _h_required,
        _kw.properties: _h_properties,
        _kw.additionalProperties: _h_additional_properties,
        _kw.patternProperties: _h_pattern_properties,
        _kw.propertyNames: _h_property_names,
        _kw.minProperties: _h_min_properties,
        _kw.maxProperties: _h_max_properties,
        _kw.dependentRequired: _h_dependent_required,
        _kw.dependentSchemas: _h_dependent_schemas,
        _lkw.dependencies_draft4_draft6_draft7: _h_dependencies,
        _kw.items: _h_items,
        _kw.prefixItems: _h_prefix_items,
        _lkw.items_draft6_draft7_draft201909: _h_items_draft6,
        _lkw.items_draft3_draft4: _h_items_draft4,
        _lkw.additionalItems: _h_additional_items,
        _kw.minItems: _h_min_items,
        _kw.maxItems: _h_max_items,
        _kw.uniqueItems: _h_unique_items,
        _kw.contains: _h_contains,
        _lkw.contains_draft6_draft7: _h_contains_draft6,
        _kw.minLength: _h_min_length,
        _kw.maxLength: _h_max_length,
        _kw.pattern: _h_pattern,
        _kw.minimum: _h_minimum,
        _kw.maximum: _h_maximum,
        _kw.exclusiveMinimum: _h_exclusive_minimum,
        _kw.exclusiveMaximum: _h_exclusive_maximum,
        _lkw.minimum_draft3_draft4: _h_minimum_draft4,
        _lkw.maximum_draft3_draft4: _h_maximum_draft4,
        _kw.multipleOf: _h_multiple_of,
    }
    # Only dialects whose type checker we mirror; draft 3 (type_draft3, "any") is left out.
    _INTEGER_ACCEPTS_FLOAT = {
        cls: cls.TYPE_CHECKER is _types.draft6_type_checker
        for cls in (
            _validators.Draft4Validator,
            _validators.Draft6Validator,
            _validators.Draft7Validator,
            _validators.Draft201909Validator,
            _validators.Draft202012Validator,
        )
        if cls.TYPE_CHECKER in (_types.draft4_type_checker, _types.draft6_type_checker)
    }


def _accept(_instance: Any) -> bool:
    return True


def _reject(_instance: Any) -> bool:
    return False


def _root_dialect(schema: dict[str, Any]) -> type | None:
    if "$schema" not in schema:
        return _validators.validator_for(schema)
    if not isinstance(schema["$schema"], str):
        return None
    try:
        # default=None: an unknown $schema gives None instead of a warning and a guess.
        return _validators.validator_for(schema, default=None)
    except Exception:  # URI normalisation can raise on odd strings
        return None


def compile_check(schema: dict[str, Any] | bool) -> Callable[[Any], bool] | None:
    """A function telling whether jsonschema would accept an instance, or None if unsupported.

    The function returns True exactly when `validator_for(schema)(schema).iter_errors(instance)`
    yields no error, for JSON instances. None means the schema uses something outside the subset
    mirrored here; use jsonschema alone for it.
    """
    if _kw is None:
        return None
    if schema is True or schema is False:
        return _accept if schema else _reject
    if not isinstance(schema, dict):
        return None
    cls = _root_dialect(schema)
    if cls is None:
        return None
    gen = _Gen()
    try:
        name = gen.function(schema, cls)
        exec(compile("\n\n".join(gen.sources), "<schemacheck>", "exec"), gen.ns)
    # Declining is always safe: the caller falls back to jsonschema.
    except (_Unsupported, RecursionError, re.error, SyntaxError, ValueError):
        return None
    check: Callable[[Any], bool] = gen.ns[name]
    return check
