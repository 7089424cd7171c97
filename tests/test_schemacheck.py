"""proxy.schemacheck agrees with jsonschema: hand-picked cases that pin jsonschema's subtleties,
a seeded differential fuzz over the supported subset, and the schemas it must decline."""

from __future__ import annotations

import datetime
import functools
import random
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from proxy import schemacheck
from proxy.schemacheck import compile_check

D3 = "http://json-schema.org/draft-03/schema#"
D4 = "http://json-schema.org/draft-04/schema#"
D6 = "http://json-schema.org/draft-06/schema#"
D7 = "http://json-schema.org/draft-07/schema#"
D2019 = "https://json-schema.org/draft/2019-09/schema"
D2020 = "https://json-schema.org/draft/2020-12/schema"


def js_valid(schema: Any, instance: Any) -> bool:
    """The reference: what proxy.policy does today."""
    cls = jsonschema.validators.validator_for(schema)
    return next(iter(cls(schema).iter_errors(instance)), None) is None


def nested_items(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def nested_list(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


SHARED = {"type": "string", "minLength": 2}  # one object used twice, as a YAML anchor would

# (schema, instance, whether jsonschema accepts it). The expectation pins jsonschema's behaviour
# too, so a jsonschema upgrade that changes a subtlety shows up here.
CASES: list[tuple[Any, Any, bool]] = [
    ({"type": "object", "required": ["query"]}, {"query": "x"}, True),
    ({"type": "object", "required": ["query"]}, {"query": None}, True),
    ({"type": "object", "required": ["query"]}, {}, False),
    ({"type": "object", "required": ["query"]}, ["query"], False),
    ({"type": "object", "required": ["query"]}, "query", False),
    ({"required": ["query"]}, "not an object", True),
    ({"required": ["a", "b", "c", "d"]}, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, True),
    ({"required": ["a", "b", "c", "d"]}, {"a": 1, "b": 1, "c": 1}, False),
    # integer: 1.0 counts from draft 6 on, never a bool
    ({"type": "integer"}, 1, True),
    ({"type": "integer"}, 1.0, True),
    ({"type": "integer"}, 1e20, True),
    ({"type": "integer"}, 1.5, False),
    ({"type": "integer"}, True, False),
    ({"type": "integer"}, 2**64, True),
    ({"$schema": D7, "type": "integer"}, 1.0, True),
    ({"$schema": D4, "type": "integer"}, 1.0, False),
    ({"$schema": D4, "type": "integer"}, 1, True),
    ({"type": "number"}, True, False),
    ({"type": "number"}, 1, True),
    ({"type": "number"}, -0.0, True),
    ({"type": "number"}, None, False),
    ({"type": ["integer", "number"]}, 1.5, True),
    ({"type": ["string", "null"]}, None, True),
    ({"type": ["string", "null"]}, "", True),
    ({"type": ["string", "null"]}, 0, False),
    ({"type": "boolean"}, False, True),
    ({"type": "boolean"}, 0, False),
    ({"type": []}, None, False),
    # enum/const use jsonschema's equal: 1 == 1.0, True != 1, structural for containers
    ({"enum": [1, "a", None]}, 1.0, True),
    ({"enum": [1, "a", None]}, True, False),
    ({"enum": [1, "a", None]}, "a", True),
    ({"enum": [1, "a", None]}, None, True),
    ({"enum": [1, "a", None]}, [1], False),
    ({"enum": [True]}, 1, False),
    ({"enum": [True]}, True, True),
    ({"enum": [0]}, False, False),
    ({"enum": [0]}, -0.0, True),
    ({"enum": ["a", "b", "c"]}, "b", True),
    ({"enum": ["a", "b", "c"]}, ["a"], False),
    ({"enum": ["a", "b", "c"]}, "A", False),
    ({"enum": [1.5, 2, 3]}, 2.0, True),
    ({"enum": [1.5, 2, 3]}, True, False),
    ({"enum": []}, None, False),
    ({"const": [1, {"a": 1.0}]}, [1.0, {"a": 1}], True),
    ({"const": [1, {"a": 1.0}]}, [True, {"a": 1}], False),
    ({"const": [1, {"a": 1.0}]}, [1, {"a": 1, "b": 2}], False),
    ({"const": {"a": [False]}}, {"a": [0]}, False),
    ({"const": {"a": [False]}}, {"a": [False]}, True),
    ({"const": None}, None, True),
    ({"const": None}, 0, False),
    ({"const": "x"}, "x", True),
    # uniqueItems is jsonschema's uniq, including its sort-then-neighbours quirk
    ({"uniqueItems": True}, [1, 1.0], False),
    ({"uniqueItems": True}, [1, True], True),
    ({"uniqueItems": True}, [0, False], True),
    ({"uniqueItems": True}, [[1], [True], [1]], True),
    ({"uniqueItems": True}, [{"a": 1}, {"a": 1.0}], False),
    ({"uniqueItems": True}, [[1, 2], [1, 2]], False),
    ({"uniqueItems": True}, ["a", 1, "a"], False),
    ({"uniqueItems": False}, [1, 1], True),
    # lengths count code points
    ({"minLength": 2}, "é", False),
    ({"minLength": 2}, "e\u0301", True),
    ({"minLength": 2}, "😀", False),
    ({"minLength": 2}, "😀😀", True),
    ({"minLength": 2}, 3, True),
    ({"maxLength": 1}, "😀", True),
    # pattern is re.search: unanchored, and "$" matches before a final newline
    ({"pattern": "^a"}, "ba", False),
    ({"pattern": "b"}, "abc", True),
    ({"pattern": "^[0-9]+$"}, "12\n", True),
    ({"pattern": "^[0-9]+$"}, 12, True),
    # numbers: bools are not numbers, so numeric keywords ignore them
    ({"minimum": 1}, 0.5, False),
    ({"minimum": 1}, 1, True),
    ({"minimum": 1}, False, True),
    ({"maximum": 1.5}, 2, False),
    ({"exclusiveMinimum": 1}, 1, False),
    ({"exclusiveMinimum": 1}, 1.0000001, True),
    ({"exclusiveMaximum": 0}, -0.0, False),
    ({"$schema": D4, "minimum": 1, "exclusiveMinimum": True}, 1, False),
    ({"$schema": D4, "minimum": 1, "exclusiveMinimum": True}, 2, True),
    ({"$schema": D4, "minimum": 1, "exclusiveMinimum": False}, 1, True),
    ({"$schema": D4, "exclusiveMinimum": True}, -5, True),
    ({"$schema": D4, "maximum": 1, "exclusiveMaximum": True}, 1, False),
    ({"multipleOf": 0.1}, 0.3, False),
    ({"multipleOf": 0.1}, 0.5, True),
    ({"multipleOf": 0.5}, 1e308, True),
    ({"multipleOf": 3}, 9.0, True),
    ({"multipleOf": 3}, 9.5, False),
    ({"multipleOf": 3}, True, True),
    ({"minItems": 1}, [], False),
    ({"maxItems": 1}, [1, 2], False),
    ({"minProperties": 1}, {}, False),
    ({"maxProperties": 1}, {"a": 1, "b": 2}, False),
    ({"maxProperties": 1}, [1, 2], True),
    # object keywords
    ({"properties": {"a": {"type": "string"}}}, {"a": 1}, False),
    ({"properties": {"a": {"type": "string"}}}, {"b": 1}, True),
    ({"properties": {"a": False}}, {"a": 1}, False),
    ({"properties": {"a": False}}, {}, True),
    ({"properties": {"a": SHARED, "b": SHARED}}, {"a": "xy", "b": "x"}, False),
    ({"properties": {"a": SHARED, "b": SHARED}}, {"a": "xy", "b": "xyz"}, True),
    ({"properties": {"a": {}}, "additionalProperties": False}, {"a": 1}, True),
    ({"properties": {"a": {}}, "additionalProperties": False}, {"a": 1, "b": 2}, False),
    ({"additionalProperties": False}, {}, True),
    ({"additionalProperties": False}, {"a": 1}, False),
    (
        {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
        {"a": "s", "b": 1},
        True,
    ),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "integer"}}, {"b": "s"}, False),
    (
        {"patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
        {"x-a": "s"},
        True,
    ),
    (
        {"patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
        {"x-a": 1},
        False,
    ),
    (
        {"patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
        {"y": 1},
        False,
    ),
    # find_additional_properties joins patterns with "|"; a lone "" joins to "" and exempts nothing
    ({"patternProperties": {"": {}}, "additionalProperties": False}, {"a": 1}, False),
    ({"patternProperties": {"": {}, "z": {}}, "additionalProperties": False}, {"a": 1}, True),
    ({"propertyNames": {"maxLength": 2}}, {"ab": 1}, True),
    ({"propertyNames": {"maxLength": 2}}, {"abc": 1}, False),
    ({"propertyNames": False}, {}, True),
    ({"dependentRequired": {"a": ["b"]}}, {"a": 1}, False),
    ({"dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, True),
    ({"dependentRequired": {"a": ["b"]}}, {"b": 2}, True),
    ({"dependentSchemas": {"a": {"required": ["b"]}}}, {"a": 1}, False),
    ({"dependentSchemas": {"a": {"required": ["b"]}}}, {"c": 1}, True),
    ({"$schema": D7, "dependencies": {"a": ["b"], "c": {"maxProperties": 1}}}, {"a": 1}, False),
    ({"$schema": D7, "dependencies": {"a": ["b"], "c": {"maxProperties": 1}}}, {"c": 1}, True),
    (
        {"$schema": D7, "dependencies": {"a": ["b"], "c": {"maxProperties": 1}}},
        {"c": 1, "d": 1},
        False,
    ),
    ({"$schema": D7, "dependentRequired": {"a": ["b"]}}, {"a": 1}, True),  # not in draft 7
    # arrays, 2020-12: prefixItems then items
    ({"prefixItems": [{"type": "string"}], "items": False}, ["a"], True),
    ({"prefixItems": [{"type": "string"}], "items": False}, ["a", 1], False),
    ({"prefixItems": [{"type": "string"}], "items": False}, [1], False),
    ({"prefixItems": [{"type": "string"}], "items": False}, [], True),
    ({"prefixItems": [{}], "items": {"type": "integer"}}, ["x", 1, 2], True),
    ({"prefixItems": [{}], "items": {"type": "integer"}}, ["x", 1, "y"], False),
    ({"items": {"type": "integer"}}, [1, 2.0], True),
    ({"items": False}, [], True),
    ({"items": False}, [1], False),
    # arrays, draft 7: items as a list, then additionalItems
    ({"$schema": D7, "items": [{"type": "string"}], "additionalItems": False}, ["a"], True),
    ({"$schema": D7, "items": [{"type": "string"}], "additionalItems": False}, ["a", "b"], False),
    ({"$schema": D7, "items": [{}], "additionalItems": {"type": "string"}}, [1, "b"], True),
    ({"$schema": D7, "items": [{}], "additionalItems": {"type": "string"}}, [1, 2], False),
    ({"$schema": D7, "additionalItems": False}, [1, 2], True),  # no-op without list items
    ({"$schema": D7, "items": {"type": "string"}}, ["a", 1], False),
    ({"$schema": D7, "items": False}, [], True),
    ({"$schema": D7, "prefixItems": [False]}, [1], True),  # not in draft 7
    ({"$schema": D4, "items": [{"type": "string"}]}, ["a", 1], True),
    # contains
    ({"contains": {"type": "integer"}}, [], False),
    ({"contains": {"type": "integer"}}, ["a", 1], True),
    ({"contains": {"type": "integer"}, "minContains": 2, "maxContains": 3}, [1, 2], True),
    ({"contains": {"type": "integer"}, "minContains": 2, "maxContains": 3}, [1], False),
    ({"contains": {"type": "integer"}, "minContains": 2, "maxContains": 3}, [1, 2, 3, 4], False),
    ({"contains": {"type": "integer"}, "minContains": 0}, [], True),
    ({"contains": {"type": "integer"}, "maxContains": 1}, [1, 2], False),
    ({"contains": {"type": "integer"}, "maxContains": 1}, [], False),
    ({"$schema": D7, "contains": {"type": "integer"}, "minContains": 0}, [], False),
    ({"$schema": D7, "contains": {"type": "integer"}}, ["a", 1], True),
    ({"$schema": D6, "contains": False}, [1], False),
    # applicators
    ({"allOf": []}, 1, True),
    ({"anyOf": []}, 1, False),
    ({"oneOf": []}, 1, False),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1, False),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1.5, True),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "x", False),
    ({"anyOf": [{"type": "string"}, {"minimum": 3}]}, 2, False),
    ({"anyOf": [{"type": "string"}, {"minimum": 3}]}, "x", True),
    ({"allOf": [{"type": "string"}, {"minLength": 2}]}, "x", False),
    ({"not": {"type": "string"}}, "a", False),
    ({"not": {"type": "string"}}, 1, True),
    ({"not": {}}, None, False),
    ({"if": {"properties": {"k": {"const": "a"}}}, "then": {"required": ["x"]}}, {"k": "a"}, False),
    ({"if": {"properties": {"k": {"const": "a"}}}, "then": {"required": ["x"]}}, {"k": "b"}, True),
    (
        {"if": {"required": ["k"]}, "then": {"required": ["x"]}, "else": {"required": ["y"]}},
        {},
        False,
    ),
    (
        {"if": {"required": ["k"]}, "then": {"required": ["x"]}, "else": {"required": ["y"]}},
        {"y": 1},
        True,
    ),
    ({"then": False, "else": False}, 1, True),  # without "if" both are ignored
    ({"$schema": D6, "if": True, "then": False}, 1, True),  # "if" is not in draft 6
    # boolean schemas, annotations, format and unknown keywords
    (True, None, True),
    (False, None, False),
    ({}, {"anything": [1]}, True),
    ({"format": "email"}, "not an email", True),
    ({"type": "string", "format": "date"}, "x", True),
    ({"title": "t", "description": "d", "default": 5, "examples": [1], "$comment": "c"}, 1, True),
    ({"x-custom": 5, "minimum": 3}, 2, False),
    ({"$defs": {"unused": {"type": "string"}}, "type": "integer"}, 1, True),
    # a nested $schema switches dialect for its subtree; an unknown one keeps the parent's
    ({"properties": {"a": {"$schema": D7, "items": [{"type": "string"}]}}}, {"a": ["s", 1]}, True),
    ({"properties": {"a": {"$schema": D7, "items": [{"type": "string"}]}}}, {"a": [1]}, False),
    ({"items": {"$schema": D4, "type": "integer"}}, [1.0], False),
    ({"items": {"$schema": "http://example.com/s", "type": "integer"}}, [1.0], True),
    # deep nesting spills into helper functions
    (nested_items(30), nested_list(30, 1), True),
    (nested_items(30), nested_list(30, "1"), False),
    (nested_items(30), nested_list(29, 1), False),
]


@pytest.mark.parametrize(("schema", "instance", "expected"), CASES)
def test_agrees_with_jsonschema(schema: Any, instance: Any, expected: bool) -> None:
    assert js_valid(schema, instance) is expected, "jsonschema's behaviour changed"
    check = compile_check(schema)
    assert check is not None
    assert check(instance) is expected


UNSUPPORTED: list[Any] = [
    {"$ref": "#/$defs/a", "$defs": {"a": {}}},
    {"properties": {"a": {"$ref": "#"}}},
    {"unevaluatedProperties": False},
    {"unevaluatedItems": False},
    {"$dynamicRef": "#a"},
    {"$schema": D2019, "$recursiveRef": "#"},
    {"$schema": D7, "$ref": "#/definitions/a", "definitions": {"a": {}}},
    {"$schema": D3, "type": "string"},
    {"$schema": "http://example.com/custom", "type": "string"},
    {"$schema": 7},
    {"properties": {"a": {"$schema": D3, "type": "any"}}},
    {"type": "strnig"},
    {"type": ["string", "foo"]},
    {"type": [{"type": "string"}]},
    {"pattern": "("},
    {"patternProperties": {"(": {}}},
    # each compiles alone, but jsonschema joins them and "a|(?i)b" is an error in Python 3.11
    {"patternProperties": {"a": {}, "(?i)b": {}}, "additionalProperties": False},
    {"properties": {"a": 5}},
    {"properties": []},
    {"properties": {"a": None}},
    {"required": "a"},
    {"enum": "abc"},
    {"enum": [datetime.date(2024, 1, 1)]},
    {"minLength": "3"},
    {"multipleOf": 0},
    {"multipleOf": float("inf")},
    {"items": [{}]},  # array form is draft 7's; jsonschema 2020-12 would crash on it
    {"$schema": D7, "items": True, "additionalItems": False},  # len(True) in jsonschema
    {"$schema": D4, "items": True},
    {"allOf": {}},
    {"not": 1},
    {"if": [], "then": {}},
    {"contains": {}, "minContains": "1"},
    [],
    "string",
    None,
]


@pytest.mark.parametrize("schema", UNSUPPORTED, ids=repr)
def test_declines_what_it_cannot_mirror(schema: Any) -> None:
    assert compile_check(schema) is None


def test_declines_a_cyclic_schema() -> None:
    schema: dict[str, Any] = {"type": "object"}
    schema["properties"] = {"child": schema}
    assert compile_check(schema) is None


def test_declines_a_schema_that_anchors_blow_up() -> None:
    schema: dict[str, Any] = {"type": "object", "required": ["a"]}
    for _ in range(25):
        schema = {"allOf": [schema, schema]}  # 2**25 copies once expanded
    assert compile_check(schema) is None


def test_deep_chains_of_boolean_applicators() -> None:
    negated: Any = {"type": "integer"}
    for _ in range(101):
        negated = {"not": negated}
    nested: Any = {"type": "string"}
    instance: Any = "leaf"
    for _ in range(60):
        object_branch = {"type": "object", "properties": {"k": nested}, "required": ["k"]}
        nested = {"anyOf": [{"type": "null"}, object_branch]}
        instance = {"k": instance}
    for schema, valid, invalid in [(negated, "x", 1), (nested, instance, {"k": 1})]:
        check = compile_check(schema)
        assert check is not None
        assert check(valid) is js_valid(schema, valid) is True
        assert check(invalid) is js_valid(schema, invalid) is False


def test_declines_everything_when_jsonschema_internals_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(schemacheck, "_kw", None)
    assert compile_check({"type": "object"}) is None


# --- differential fuzz -------------------------------------------------------------------------

KEYS = ["a", "b", "c", "é", "x-1"]
STRINGS = ["", "a", "A", "b", "ab", "abc", "é", "e\u0301", "😀", "x-1", "A1", "12\n", "ключ"]
NUMBERS = [0, 1, -1, 2, 3, 7, 0.0, -0.0, 1.0, 0.5, 1.5, 2.5, 0.3, 1e20, 2**53 + 1, -3.75]
SCALARS: list[Any] = [None, True, False, *NUMBERS, *STRINGS]
TYPES = ["object", "array", "string", "number", "integer", "null", "boolean"]
# No inline flags: jsonschema joins patternProperties keys, and "a|(?i)b" does not compile.
PATTERNS = ["^a", "b$", "", "^x-", "\\d", "é", "^[a-c]+$", "^(ab|c)$"]
BOUNDS = [-1, 0, 0.5, 1, 1.5, 2, 3]
DRAFTS = {"4": D4, "6": D6, "7": D7, "2019": D2019, "2020": D2020}
ANNOTATIONS = ["title", "description", "default", "examples", "$comment", "x-vendor"]


def rand_json(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth <= 0 or roll < 0.55:
        return rng.choice(SCALARS)
    if roll < 0.78:
        return [rand_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(KEYS): rand_json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


class SchemaFuzzer:
    """Random schemas from the supported subset, keyword by keyword, for one draft at a time."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def schema(self, draft: str, depth: int, root: bool = False) -> Any:
        rng = self.rng
        if not root and rng.random() < 0.08:
            return rng.random() < 0.7
        schema: dict[str, Any] = {}
        if not root and rng.random() < 0.05:
            draft = rng.choice(list(DRAFTS))
            schema["$schema"] = DRAFTS[draft]
        if rng.random() < 0.4:  # type drives both narrowing and the integer rules
            self.kw_type(schema, draft, depth)
        for _ in range(rng.randint(1, 3) if depth > 0 else 1):
            keyword = rng.choice(self.keywords(draft, depth))
            getattr(self, "kw_" + keyword)(schema, draft, depth)
        if draft == "4" and isinstance(schema.get("items"), bool):
            schema["items"] = {}  # jsonschema's draft 4 items zips over a bool and raises
        if draft in ("6", "7", "2019") and isinstance(schema.get("items"), bool):
            schema.pop("additionalItems", None)  # jsonschema raises on len(bool)
        return schema

    def keywords(self, draft: str, depth: int) -> list[str]:
        leaf = ["type", "enum", "required", "minProperties", "maxProperties", "minItems"]
        leaf += ["maxItems", "uniqueItems", "minLength", "maxLength", "pattern", "minimum"]
        leaf += ["maximum", "exclusive", "multipleOf", "format", "annotation"]
        nested = ["properties", "additionalProperties", "patternProperties", "items"]
        nested += ["allOf", "anyOf", "oneOf", "not"]
        if draft != "4":
            leaf.append("const")
            nested += ["propertyNames", "contains"]
        if draft != "2020":
            nested.append("additionalItems")
        if draft in ("4", "6", "7"):
            nested.append("dependencies")
        else:
            leaf.append("dependentRequired")
            nested.append("dependentSchemas")
        if draft not in ("4", "6"):
            nested.append("if")
        if draft == "2020":
            nested.append("prefixItems")
        return leaf + nested if depth > 0 else leaf

    def sub(self, draft: str, depth: int) -> Any:
        return self.schema(draft, depth - 1)

    def subs(self, draft: str, depth: int) -> list[Any]:
        count = self.rng.choice([0, 1, 2, 2, 3, 3])
        return [self.sub(draft, depth) for _ in range(count)]

    def keys(self) -> list[str]:
        return self.rng.sample(KEYS, self.rng.randint(1, 3))

    def kw_type(self, s: dict[str, Any], draft: str, depth: int) -> None:
        rng = self.rng
        s["type"] = (
            rng.choice(TYPES) if rng.random() < 0.6 else rng.sample(TYPES, rng.randint(1, 3))
        )

    def kw_enum(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["enum"] = [rand_json(self.rng, 1) for _ in range(self.rng.randint(1, 4))]

    def kw_const(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["const"] = rand_json(self.rng, 2)

    def kw_required(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["required"] = self.rng.sample(KEYS, self.rng.randint(0, 5))

    def kw_count(self, s: dict[str, Any], keyword: str) -> None:
        s[keyword] = self.rng.randint(0, 3)

    def kw_minProperties(self, s: dict[str, Any], draft: str, depth: int) -> None:
        self.kw_count(s, "minProperties")

    def kw_maxProperties(self, s: dict[str, Any], draft: str, depth: int) -> None:
        self.kw_count(s, "maxProperties")

    def kw_minItems(self, s: dict[str, Any], draft: str, depth: int) -> None:
        self.kw_count(s, "minItems")

    def kw_maxItems(self, s: dict[str, Any], draft: str, depth: int) -> None:
        self.kw_count(s, "maxItems")

    def kw_minLength(self, s: dict[str, Any], draft: str, depth: int) -> None:
        self.kw_count(s, "minLength")

    def kw_maxLength(self, s: dict[str, Any], draft: str, depth: int) -> None:
        self.kw_count(s, "maxLength")

    def kw_uniqueItems(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["uniqueItems"] = self.rng.random() < 0.8

    def kw_pattern(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["pattern"] = self.rng.choice(PATTERNS)

    def kw_minimum(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["minimum"] = self.rng.choice(BOUNDS)

    def kw_maximum(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["maximum"] = self.rng.choice(BOUNDS)

    def kw_exclusive(self, s: dict[str, Any], draft: str, depth: int) -> None:
        side = self.rng.choice(["Minimum", "Maximum"])
        if draft == "4":  # a boolean that modifies minimum/maximum
            s[side.lower()] = self.rng.choice(BOUNDS)
            s["exclusive" + side] = self.rng.random() < 0.7
        else:
            s["exclusive" + side] = self.rng.choice(BOUNDS)

    def kw_multipleOf(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["multipleOf"] = self.rng.choice([1, 2, 3, 0.5, 0.1, 0.25, 1.5])

    def kw_format(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["format"] = self.rng.choice(["email", "date", "uri", "ipv4"])

    def kw_annotation(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s[self.rng.choice(ANNOTATIONS)] = rand_json(self.rng, 1)

    def kw_dependentRequired(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["dependentRequired"] = {k: self.rng.sample(KEYS, 2) for k in self.keys()}

    def kw_properties(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["properties"] = {k: self.sub(draft, depth) for k in self.keys()}

    def kw_additionalProperties(self, s: dict[str, Any], draft: str, depth: int) -> None:
        rng = self.rng
        s["additionalProperties"] = (
            rng.random() < 0.3 if rng.random() < 0.5 else self.sub(draft, depth)
        )
        if rng.random() < 0.5:
            self.kw_properties(s, draft, depth)

    def kw_patternProperties(self, s: dict[str, Any], draft: str, depth: int) -> None:
        patterns = self.rng.sample(PATTERNS, self.rng.randint(1, 2))
        s["patternProperties"] = {p: self.sub(draft, depth) for p in patterns}

    def kw_propertyNames(self, s: dict[str, Any], draft: str, depth: int) -> None:
        names = [{"maxLength": 1}, {"pattern": self.rng.choice(PATTERNS)}, {"enum": KEYS[:2]}]
        s["propertyNames"] = self.rng.choice([*names, self.sub(draft, depth)])

    def kw_items(self, s: dict[str, Any], draft: str, depth: int) -> None:
        roll = self.rng.random()
        if draft != "2020" and roll < 0.35:
            s["items"] = self.subs(draft, depth)
        elif draft != "4" and roll < 0.5:
            s["items"] = self.rng.random() < 0.5
        else:
            s["items"] = self.sub(draft, depth)

    def kw_prefixItems(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["prefixItems"] = self.subs(draft, depth)

    def kw_additionalItems(self, s: dict[str, Any], draft: str, depth: int) -> None:
        rng = self.rng
        s["additionalItems"] = rng.random() < 0.5 if rng.random() < 0.5 else self.sub(draft, depth)
        if rng.random() < 0.7:
            s["items"] = self.subs(draft, depth)

    def kw_contains(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["contains"] = self.sub(draft, depth)
        for bound in ("minContains", "maxContains"):
            if self.rng.random() < 0.3:
                s[bound] = self.rng.randint(0, 3)  # ignored before 2019-09, which is exact too

    def kw_allOf(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["allOf"] = self.subs(draft, depth)

    def kw_anyOf(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["anyOf"] = self.subs(draft, depth)

    def kw_oneOf(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["oneOf"] = self.subs(draft, depth)

    def kw_not(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["not"] = self.sub(draft, depth)

    def kw_if(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["if"] = self.sub(draft, depth)
        for branch in ("then", "else"):
            if self.rng.random() < 0.7:
                s[branch] = self.sub(draft, depth)

    def kw_dependencies(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["dependencies"] = {
            k: self.rng.sample(KEYS, 2) if self.rng.random() < 0.5 else self.sub(draft, depth)
            for k in self.keys()
        }

    def kw_dependentSchemas(self, s: dict[str, Any], draft: str, depth: int) -> None:
        s["dependentSchemas"] = {k: self.sub(draft, depth) for k in self.keys()}


ARRAY_KEYWORDS = {"items", "prefixItems", "uniqueItems", "contains", "minItems", "maxItems"}


def twin(value: Any) -> Any:
    """A value jsonschema's equal() calls equal but Python's == or repr() may not, or vice versa."""
    if isinstance(value, bool):
        return int(value)  # == but not equal()
    if isinstance(value, int):
        return float(value)  # equal() but another repr
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [twin(v) for v in value]
    if isinstance(value, dict):
        return {k: twin(v) for k, v in value.items()}
    return value


def maybe_twin(rng: random.Random, value: Any) -> Any:
    return twin(value) if rng.random() < 0.3 else value


def guess(rng: random.Random, schema: Any, depth: int) -> Any:
    """An instance shaped after the schema, so that a fair share of cases are valid."""
    if not isinstance(schema, dict) or depth <= 0 or rng.random() < 0.15:
        return rand_json(rng, 2)
    if "const" in schema and rng.random() < 0.7:
        return maybe_twin(rng, schema["const"])
    if "enum" in schema and schema["enum"] and rng.random() < 0.7:
        return maybe_twin(rng, rng.choice(schema["enum"]))
    types = schema.get("type", rng.choice(TYPES))
    kind = rng.choice(types) if isinstance(types, list) and types else types
    if kind == "object" or "properties" in schema or "required" in schema:
        keys = list(schema.get("properties", {})) + list(schema.get("required", []))
        props = schema.get("properties", {})
        return {k: guess(rng, props.get(k), depth - 1) for k in keys if rng.random() < 0.85}
    if kind == "array" or ARRAY_KEYWORDS & schema.keys():
        items = schema.get("items", schema.get("contains"))
        result = [guess(rng, items, depth - 1) for _ in range(rng.randint(0, 3))]
        if result and rng.random() < 0.5:
            result.append(twin(rng.choice(result)))
        return result
    if kind == "string":
        return rng.choice(STRINGS)
    if kind in ("number", "integer"):
        return rng.choice(NUMBERS)
    return rng.choice([None, True, False])


@functools.cache
def fuzz_cases() -> list[tuple[Any, list[Any]]]:
    rng = random.Random(20240601)
    fuzzer = SchemaFuzzer(rng)
    cases = []
    for index in range(400):
        draft = list(DRAFTS)[index % len(DRAFTS)]
        schema = fuzzer.schema(draft, rng.randint(0, 3), root=True)
        if draft != "2020" or rng.random() < 0.5:  # 2020-12 is also the default
            schema["$schema"] = DRAFTS[draft]
        instances = [rand_json(rng, 3) for _ in range(6)]
        instances += [guess(rng, schema, 4) for _ in range(9)]
        cases.append((schema, instances))
    return cases


Compiler = Callable[[Any], Callable[[Any], bool] | None]


def disagreements(compile_fn: Compiler) -> tuple[list[tuple[Any, Any]], int, int]:
    """Cases where compile_fn's check and jsonschema differ, the cases run, the valid ones."""
    wrong, total, valid = [], 0, 0
    for schema, instances in fuzz_cases():
        check = compile_fn(schema)
        assert check is not None, f"declined a schema from the supported subset: {schema!r}"
        for instance in instances:
            expected = js_valid(schema, instance)
            total += 1
            valid += expected
            if check(instance) is not expected:
                wrong.append((schema, instance))
    return wrong, total, valid


def test_fuzz_agrees_with_jsonschema() -> None:
    wrong, total, valid = disagreements(compile_check)
    assert not wrong, f"{len(wrong)} of {total} disagree, first: {wrong[0]!r}"
    assert total == 6000
    # Both outcomes must be common, or agreement would say little.
    assert 0.2 * total < valid < 0.8 * total, valid


@pytest.mark.parametrize(
    ("name", "replacement"),
    [
        # draft 4 and draft 6+ disagree on whether 1.0 is an integer
        ("_INTEGER_ACCEPTS_FLOAT", {cls: True for cls in schemacheck._INTEGER_ACCEPTS_FLOAT}),
        # a set-based uniqueness check gets 1 vs 1.0 and True vs 1 wrong
        ("_uniq", lambda items: len({repr(i) for i in items}) == len(items)),
        # the plain float remainder is not jsonschema's rule for float multipleOf
        ("_float_multiple_fails", lambda value, divisor: value % divisor != 0),
    ],
)
def test_fuzz_catches_a_subtly_wrong_checker(
    monkeypatch: pytest.MonkeyPatch, name: str, replacement: Any
) -> None:
    monkeypatch.setattr(schemacheck, name, replacement)
    wrong, _, _ = disagreements(compile_check)
    assert wrong
