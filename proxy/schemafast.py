"""A fast validity check (jsonschema-rs) that agrees with `jsonschema` on a bounded subset.

`compile_check(schema)` returns a function `f(instance) -> bool` that is True exactly when
`validator_for(schema)(schema).iter_errors(instance)` yields nothing (how proxy.policy builds
its validator: no format checker, so `format` is an annotation), or None when the schema is
outside the subset; the caller then uses jsonschema alone, and always uses it to word errors.
Exactness is claimed for instances as `orjson.loads` builds them (finite floats, integers
within 64 bits) and is what the differential fuzz in tests/test_schemacheck.py accepts.

The subset is what that fuzz covers, and it leaves out what the two libraries do differently:
- `$ref` and the dynamic references: a reference cycle that consumes no instance makes
  jsonschema recurse until it raises (the gate blocks) where jsonschema-rs accepts.
- a keyword outside the fuzzed vocabulary of the schema's draft (`contentMediaType`, for one,
  is asserted by jsonschema-rs in draft 7 and ignored by jsonschema); `$schema` below the root.
- a `multipleOf` that is not an integer: jsonschema's float rule says 0.3 is not a multiple of
  0.1, jsonschema-rs says it is.
- regular expressions outside a common dialect. jsonschema runs Python's `re.search`,
  jsonschema-rs an ECMA-262 dialect: `\\d`, `\\w`, `\\s`, `\\b` and their negations are Unicode
  classes in one and ASCII in the other, inline flags differ. Patterns made of literals, escaped
  punctuation, plain character classes, groups, alternation and quantifiers mean the same in
  both, except two things this module rewrites for jsonschema-rs: Python's `$` also matches
  before a final newline (`(?=\\n?$)`), and Python's `.` matches `\\r` and U+2028 (`[^\\n]`).
- the cases where jsonschema itself raises (draft 4 `items: true`, a boolean `items` with
  `additionalItems`), and a lone "" in `patternProperties` next to `additionalProperties`
  (jsonschema joins the patterns, and "" joins to nothing).
Declining is always safe; so is a false verdict, since the gate then asks jsonschema.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import jsonschema
import jsonschema_rs

# jsonschema's dialect -> jsonschema-rs's: the class, not `$schema`, then picks the rules.
_ENGINES: dict[Any, Any] = {
    jsonschema.Draft4Validator: jsonschema_rs.Draft4Validator,
    jsonschema.Draft6Validator: jsonschema_rs.Draft6Validator,
    jsonschema.Draft7Validator: jsonschema_rs.Draft7Validator,
    jsonschema.Draft201909Validator: jsonschema_rs.Draft201909Validator,
    jsonschema.Draft202012Validator: jsonschema_rs.Draft202012Validator,
}

# The vocabulary the differential fuzz generates, per draft (a keyword of another draft is
# declined rather than trusted to be ignored the same way by both).
_COMMON = frozenset(
    "type enum required minProperties maxProperties minItems maxItems uniqueItems minLength"
    " maxLength pattern minimum maximum exclusiveMinimum exclusiveMaximum multipleOf format"
    " properties additionalProperties patternProperties items allOf anyOf oneOf not"
    " title description default examples $comment definitions".split()
)
_D4 = _COMMON | {"additionalItems", "dependencies"}
_D6 = _D4 | {"const", "propertyNames", "contains", "minContains", "maxContains"}
_D7 = _D6 | {"if", "then", "else"}
_D2019 = (_D7 - {"dependencies"}) | {"dependentRequired", "dependentSchemas", "$defs"}
_D2020 = (_D2019 - {"additionalItems"}) | {"prefixItems"}
_VOCABULARY: dict[Any, frozenset[str]] = {
    jsonschema.Draft4Validator: _D4,
    jsonschema.Draft6Validator: _D6,
    jsonschema.Draft7Validator: _D7,
    jsonschema.Draft201909Validator: _D2019,
    jsonschema.Draft202012Validator: _D2020,
}
_ONE = frozenset(
    "additionalProperties additionalItems contains not if then else propertyNames".split()
)
_MANY = frozenset("allOf anyOf oneOf prefixItems".split())
_MAP = frozenset("properties patternProperties dependentSchemas $defs definitions".split())
_BOUNDS = frozenset("minimum maximum exclusiveMinimum exclusiveMaximum".split())

# A schema expanded past this many nodes (YAML anchors can multiply a small one) is declined:
# jsonschema-rs receives it expanded.
_MAX_NODES = 20_000
# orjson's integers, and floats that compare with them exactly.
_INT_RANGE = (-(2**63), 2**64 - 1)
_MAX_EXACT_FLOAT = 2.0**53

_ESCAPABLE = frozenset("\\.^$*+?{}[]()|/-")
_CONTROL_ESCAPES = frozenset("ntrfv")
_QUANTIFIER = re.compile(r"\{\d+(?:,\d*)?\}")
# Python's `$` (end, or before a final newline) and `.` (anything but a newline).
_PY_DOLLAR = r"(?=\n?$)"
_PY_DOT = r"[^\n]"


class _Unsupported(Exception):
    """The schema needs something where the two libraries are not known to agree."""


def _accept(_instance: Any) -> bool:
    return True


def _reject(_instance: Any) -> bool:
    return False


def compile_check(schema: Any) -> Callable[[Any], bool] | None:
    """A function telling whether jsonschema would accept an instance, or None if unsupported."""
    if schema is True or schema is False:
        return _accept if schema else _reject
    if not isinstance(schema, dict):
        return None
    cls = _dialect(schema)
    engine = _ENGINES.get(cls)
    if engine is None:
        return None
    try:
        translated = _Translator(cls).root(schema)
        validator = engine(
            translated,
            validate_formats=False,  # jsonschema without a format checker
            offline=True,  # never fetch a remote schema at load time
            pattern_options=jsonschema_rs.FancyRegexOptions(),  # for the `$` lookahead
        )
    # Declining is always safe: the caller falls back to jsonschema. Whatever jsonschema-rs
    # refuses (a value it cannot convert, a schema too deep, one it reads as invalid) is declined.
    except Exception:
        return None
    check: Callable[[Any], bool] = validator.is_valid
    return check


def _dialect(schema: dict[str, Any]) -> Any:
    if "$schema" not in schema:
        return jsonschema.validators.validator_for(schema)  # what proxy.policy uses
    if not isinstance(schema["$schema"], str):
        return None
    try:
        # default=None: an unknown $schema gives None instead of a warning and a guess.
        return jsonschema.validators.validator_for(schema, default=None)  # type: ignore[arg-type]
    except Exception:  # URI normalisation can raise on odd strings
        return None


class _Translator:
    """Checks a schema against the subset and copies it for jsonschema-rs (patterns rewritten).

    Each distinct dict is translated once, so a schema shared through YAML anchors costs its
    size, not its expansion; the expansion is counted, and a cycle is declined.
    """

    def __init__(self, cls: Any) -> None:
        self.vocabulary = _VOCABULARY[cls]
        self.draft4 = cls is jsonschema.Draft4Validator
        self.done: dict[int, tuple[dict[str, Any], int]] = {}
        self.active: set[int] = set()

    def root(self, schema: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in schema.items() if k != "$schema"}
        translated, size = self.schema(body)
        if size > _MAX_NODES:
            raise _Unsupported("schema too large once expanded")
        assert isinstance(translated, dict)
        return translated

    def schema(self, schema: Any) -> tuple[Any, int]:
        if isinstance(schema, bool):
            return schema, 1
        if not isinstance(schema, dict):
            raise _Unsupported("not a schema")
        key = id(schema)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise _Unsupported("cyclic schema")
        self.active.add(key)
        out: dict[str, Any] = {}
        size = 1
        for keyword, value in schema.items():
            out[keyword], cost = self.keyword(schema, keyword, value)
            size += cost
            if size > _MAX_NODES:
                raise _Unsupported("schema too large once expanded")
        self.active.discard(key)
        self.done[key] = (out, size)
        return out, size

    def keyword(self, schema: dict[str, Any], keyword: str, value: Any) -> tuple[Any, int]:
        if keyword not in self.vocabulary and not keyword.startswith("x-"):
            raise _Unsupported(f"keyword {keyword!r}")
        if keyword in _ONE:
            return self.schema(value)
        if keyword in _MANY:
            return self.many(value)
        if keyword in _MAP:
            return self.mapping(schema, keyword, value)
        if keyword == "items":
            return self.items(schema, value)
        if keyword == "dependencies":
            return self.dependencies(value)
        if keyword == "pattern":
            return translate_pattern(value), 1
        _check_value(keyword, value)
        return value, 1

    def many(self, value: Any) -> tuple[list[Any], int]:
        if not isinstance(value, list):
            raise _Unsupported("expected a list of schemas")
        pairs = [self.schema(v) for v in value]
        return [s for s, _ in pairs], 1 + sum(n for _, n in pairs)

    def mapping(self, schema: dict[str, Any], keyword: str, value: Any) -> tuple[Any, int]:
        if not isinstance(value, dict):
            raise _Unsupported("expected an object of schemas")
        if keyword == "patternProperties" and "" in value and "additionalProperties" in schema:
            if len(value) == 1:
                raise _Unsupported("jsonschema joins a lone '' pattern to nothing")
        out, size = {}, 1
        for name, sub in value.items():
            if keyword == "patternProperties":
                name = translate_pattern(name)
            out[name], cost = self.schema(sub)
            size += cost
        return out, size

    def items(self, schema: dict[str, Any], value: Any) -> tuple[Any, int]:
        if isinstance(value, list):
            return self.many(value)
        if isinstance(value, bool) and (self.draft4 or "additionalItems" in schema):
            raise _Unsupported("jsonschema raises on a boolean items here")
        return self.schema(value)

    def dependencies(self, value: Any) -> tuple[Any, int]:
        if not isinstance(value, dict):
            raise _Unsupported("expected an object")
        out, size = {}, 1
        for name, dep in value.items():
            if isinstance(dep, list):
                out[name], cost = dep, 1
            else:
                out[name], cost = self.schema(dep)
            size += cost
        return out, size


def _check_value(keyword: str, value: Any) -> None:
    if keyword == "multipleOf" and (type(value) is not int or value <= 0):
        raise _Unsupported("multipleOf other than a positive integer")
    if keyword in _BOUNDS and not isinstance(value, bool):
        if not _exact_number(value):
            raise _Unsupported(f"{keyword} out of the exactly compared range")
    if keyword in ("enum", "const") and not _plain_json(value):
        raise _Unsupported(f"{keyword} holds a value outside JSON as orjson reads it")


def _exact_number(value: Any) -> bool:
    if type(value) is int:
        return _INT_RANGE[0] <= value <= _INT_RANGE[1]
    return type(value) is float and math.isfinite(value) and abs(value) <= _MAX_EXACT_FLOAT


def _plain_json(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            if not all(type(k) is str for k in item):
                return False
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is int:
            if not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif kind not in (str, bool, type(None)):
            return False
    return True


def translate_pattern(pattern: Any) -> str:
    """The pattern for jsonschema-rs with Python's meaning, or _Unsupported.

    Accepts only the dialect both engines read alike (see the module docstring), and rewrites
    `$` and `.` outside classes to Python's meaning.
    """
    if not isinstance(pattern, str):
        raise _Unsupported("pattern is not a string")
    try:
        with warnings.catch_warnings():
            # e.g. "[[" or "&&" in a class: Python warns that its meaning will change
            warnings.simplefilter("error", FutureWarning)
            re.compile(pattern)
    except (re.error, FutureWarning) as exc:
        raise _Unsupported("not a Python regular expression of stable meaning") from exc
    out: list[str] = []
    quantifiable = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(_escape(pattern, i))
            i += 2
            quantifiable = True
        elif c == "[":
            end = _class_end(pattern, i)
            out.append(pattern[i:end])
            i = end
            quantifiable = True
        elif c == "(":
            if pattern.startswith("(?", i) and not pattern.startswith("(?:", i):
                raise _Unsupported("group extension or inline flag")
            step = 3 if pattern.startswith("(?:", i) else 1
            out.append(pattern[i : i + step])
            i += step
            quantifiable = False
        elif c in "*+?{":
            i = _quantifier(pattern, i, quantifiable, out)
            quantifiable = False
        elif c in "]}":
            raise _Unsupported("unbalanced bracket read as a literal")
        else:
            out.append(_PY_DOLLAR if c == "$" else _PY_DOT if c == "." else c)
            i += 1
            quantifiable = c not in "|^$"
    return "".join(out)


def _escape(pattern: str, i: int) -> str:
    if i + 1 < len(pattern):
        nxt = pattern[i + 1]
        if nxt in _ESCAPABLE or nxt in _CONTROL_ESCAPES:
            return pattern[i : i + 2]
    raise _Unsupported("escape outside the common dialect")


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class at `start`, a plain one (literals and ranges)."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        raise _Unsupported("']' first in a class")  # a literal in Python, empty class in ECMA
    while i < len(pattern):
        c = pattern[i]
        if c == "]":
            return i + 1
        if c == "\\":
            _escape(pattern, i)
            i += 2
            continue
        if c == "[" or pattern.startswith(("&&", "--", "~~", "||"), i):
            raise _Unsupported("nested class or class set operation")
        i += 1
    raise _Unsupported("unterminated class")


def _quantifier(pattern: str, i: int, quantifiable: bool, out: list[str]) -> int:
    if not quantifiable:
        raise _Unsupported("quantifier without an atom")
    if pattern[i] == "{":
        match = _QUANTIFIER.match(pattern, i)
        if match is None:
            raise _Unsupported("brace that is not a quantifier")
        end = match.end()
    else:
        end = i + 1
    if pattern.startswith("?", end):
        end += 1  # lazy: only the match's extent changes, and search ignores it
    if end < len(pattern) and pattern[end] in "*+?{":
        raise _Unsupported("possessive or repeated quantifier")
    out.append(pattern[i:end])
    return end
