"""proxy.schemafast (jsonschema-rs) agrees with jsonschema, the reference: hand-picked cases that
pin jsonschema's subtleties, a seeded differential fuzz bounded by a case count (the acceptance
test of the fast path), and the schemas it must decline."""

from __future__ import annotations

import datetime
import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest

from proxy import schemafast
from proxy.gates import decide
from proxy.gates.arguments import MAX_ARGUMENT_DEPTH
from proxy.policy import load_policy_text
from proxy.schemafast import compile_check, translate_pattern
from proxy.store.memory import MemoryStore
from tests.test_gate_pipeline import call, ctx

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


# Schemas of CASES the fast check declines (jsonschema then decides alone): a float multipleOf,
# a nested $schema, a keyword of another draft, jsonschema's lone "" quirk, and schemas that fail
# the meta-schema (proxy.policy refuses those at load; jsonschema-rs refuses to compile them).
DECLINED: list[Any] = []


def declined(schema: Any) -> Any:
    DECLINED.append(schema)
    return schema


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
    (declined({"type": []}), None, False),
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
    (declined({"$schema": D4, "exclusiveMinimum": True}), -5, True),
    ({"$schema": D4, "maximum": 1, "exclusiveMaximum": True}, 1, False),
    (declined({"multipleOf": 0.1}), 0.3, False),
    (declined({"multipleOf": 0.1}), 0.5, True),
    (declined({"multipleOf": 0.5}), 1e308, True),
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
    (declined({"patternProperties": {"": {}}, "additionalProperties": False}), {"a": 1}, False),
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
    (
        declined({"$schema": D7, "dependentRequired": {"a": ["b"]}}),
        {"a": 1},
        True,
    ),  # not in draft 7
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
    (declined({"$schema": D7, "prefixItems": [False]}), [1], True),  # not in draft 7
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
    (declined({"allOf": []}), 1, True),
    (declined({"anyOf": []}), 1, False),
    (declined({"oneOf": []}), 1, False),
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
    (declined({"$schema": D6, "if": True, "then": False}), 1, True),  # "if" is not in draft 6
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
    (
        declined({"properties": {"a": {"$schema": D7, "items": [{"type": "string"}]}}}),
        {"a": ["s", 1]},
        True,
    ),
    (
        declined({"properties": {"a": {"$schema": D7, "items": [{"type": "string"}]}}}),
        {"a": [1]},
        False,
    ),
    (declined({"items": {"$schema": D4, "type": "integer"}}), [1.0], False),
    (declined({"items": {"$schema": "http://example.com/s", "type": "integer"}}), [1.0], True),
    # deep nesting spills into helper functions
    (nested_items(30), nested_list(30, 1), True),
    (nested_items(30), nested_list(30, "1"), False),
    (nested_items(30), nested_list(29, 1), False),
]


@pytest.mark.parametrize(("schema", "instance", "expected"), CASES)
def test_agrees_with_jsonschema(schema: Any, instance: Any, expected: bool) -> None:
    assert js_valid(schema, instance) is expected, "jsonschema's behaviour changed"
    check = compile_check(schema)
    if any(schema is d for d in DECLINED):
        assert check is None
        return
    assert check is not None
    assert check(instance) is expected


# jsonschema's uniq sorts and compares neighbours, so [[1], [True], [1]] passes uniqueItems;
# jsonschema-rs says it repeats [1]. A false verdict only sends the call to jsonschema, which
# accepts it: the gate's answer is jsonschema's.
STRICTER: list[tuple[Any, Any]] = [({"uniqueItems": True}, [[1], [True], [1]])]


@pytest.mark.parametrize(("schema", "instance"), STRICTER)
async def test_stricter_verdicts_are_settled_by_jsonschema(schema: Any, instance: Any) -> None:
    check = compile_check(schema)
    assert check is not None
    assert check(instance) is False
    assert js_valid(schema, instance) is True
    policy = load_policy_text(SCHEMA_POLICY.format(schema=json.dumps(schema)))
    decision = await decide(call(json.dumps(instance)), policy, MemoryStore(), ctx())
    assert decision.allowed


SCHEMA_POLICY = """
upstream: {{base_url: "http://127.0.0.1:9/v1"}}
tools:
  fetch:
    arguments_schema: {schema}
"""


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
    # where jsonschema-rs is known to disagree with jsonschema
    {"$ref": "#"},  # jsonschema recurses until it raises (the gate blocks); jsonschema-rs accepts
    {"$ref": "#/$defs/missing"},  # unresolvable: jsonschema raises when checking, the gate blocks
    {"$ref": "http://example.com/schema.json"},  # nothing is fetched
    {"$schema": D7, "contentMediaType": "application/json"},  # asserted by jsonschema-rs
    {"$schema": D7, "contentEncoding": "base64"},
    {"multipleOf": 0.1},  # jsonschema: 0.3 is not a multiple of 0.1; jsonschema-rs: it is
    {"multipleOf": 2.0},
    {"maximum": float("inf")},
    {"minimum": 2**70},
    {"enum": [float("nan")]},
    {"const": 2**64},
    {"items": {"$schema": D4, "type": "integer"}},  # a dialect switch below the root
    {"$schema": D7, "prefixItems": [False]},  # a keyword of another draft
    {"$schema": D6, "if": {"type": "string"}, "then": False},
    {"patternProperties": {"": {}}, "additionalProperties": False},  # jsonschema's join quirk
    {"$schema": D6, "items": True, "additionalItems": False},
    {"readOnly": True},  # outside the fuzzed vocabulary
    [],
    "string",
    None,
]


@pytest.mark.parametrize("schema", UNSUPPORTED, ids=repr)
def test_declines_what_it_cannot_match(schema: Any) -> None:
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


def test_shared_subschemas_compile_once() -> None:
    schema: dict[str, Any] = {"type": "string", "pattern": "^a.$"}
    for _ in range(10):
        schema = {"anyOf": [schema, schema]}  # 1024 copies once expanded: still small
    check = compile_check(schema)
    assert check is not None
    assert check("ab\n") is js_valid(schema, "ab\n") is True
    assert check("a\nb") is js_valid(schema, "a\nb") is False


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


def test_a_schema_too_deep_for_jsonschema_rs_is_declined() -> None:
    schema: Any = {"type": "integer"}
    for _ in range(2000):
        schema = {"not": schema}
    assert compile_check(schema) is None  # jsonschema-rs refuses it; nothing crashes


def test_arguments_as_deep_as_the_gate_lets_through() -> None:
    schema = nested_items(MAX_ARGUMENT_DEPTH - 1)
    check = compile_check(schema)
    assert check is not None
    for leaf in (1, "1"):
        instance = nested_list(MAX_ARGUMENT_DEPTH - 1, leaf)
        assert check(instance) is js_valid(schema, instance) is (leaf == 1)
    loose = compile_check({"type": "array"})
    assert loose is not None
    assert loose(nested_list(MAX_ARGUMENT_DEPTH, 1)) is True


def test_declines_a_dialect_without_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. a jsonschema release whose default draft jsonschema-rs does not map yet
    monkeypatch.setattr(schemafast, "_ENGINES", {})
    assert compile_check({"type": "object"}) is None


async def test_unresolvable_references_block_at_the_gate() -> None:
    for ref in ("#/$defs/missing", "http://127.0.0.1:9/schema.json"):
        schema = {"type": "object", "properties": {"url": {"$ref": ref}}}
        policy = load_policy_text(SCHEMA_POLICY.format(schema=json.dumps(schema)))
        assert policy.tools["fetch"].schema_check is None
        decision = await decide(call('{"url": "x"}'), policy, MemoryStore(), ctx())
        assert decision.block is not None and decision.block.reason == "rule_error"


# (Python pattern, what jsonschema-rs is given): the common dialect passes, `$` and `.` take
# Python's meaning.
TRANSLATED = [
    ("^a", "^a"),
    ("^[0-9]+$", "^[0-9]+(?=\\n?$)"),
    ("^a.b$", "^a[^\\n]b(?=\\n?$)"),
    ("[.$]", "[.$]"),
    ("^(ab|c)?x{2,3}?y{1,}\\.\\$$", "^(ab|c)?x{2,3}?y{1,}\\.\\$(?=\\n?$)"),
    ("(?:é|😀)+\\n", "(?:é|😀)+\\n"),
    ("[^a-c\\]]", "[^a-c\\]]"),
]
# Patterns whose meaning differs between Python's re and jsonschema-rs, or is not checked here.
UNTRANSLATED = [
    "\\d",  # Unicode digits in Python, ASCII in jsonschema-rs
    "\\D",
    "\\w",
    "\\s",
    "\\bword",
    "a\\Z",
    "(?i)k",  # inline flags: case folding tables differ
    "(?P<n>a)(?P=n)",
    "(a)\\1",
    "(?=a)",
    "[[:alpha:]]",  # a POSIX class in jsonschema-rs, a set of characters in Python
    "[a-z&&[^b]]",
    "[]a]",
    "a{,2}",
    "a*+",
    "a{2",
    "a}",
    "*a",
    "(",
    "\\p{L}",
]


@pytest.mark.parametrize(("pattern", "expected"), TRANSLATED)
def test_patterns_of_the_common_dialect(pattern: str, expected: str) -> None:
    assert translate_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", UNTRANSLATED)
def test_patterns_outside_the_common_dialect_are_declined(pattern: str) -> None:
    assert compile_check({"pattern": pattern}) is None
    assert compile_check({"patternProperties": {pattern: {}}}) is None
    assert compile_check({"not": {"propertyNames": {"pattern": pattern}}}) is None


# --- differential fuzz -------------------------------------------------------------------------

KEYS = ["a", "b", "c", "é", "x-1", "b\n", "x-٣"]
# Strings where the regex dialects part: a final newline, \r and U+2028, Unicode digits/letters.
STRINGS = ["", "a", "A", "b", "ab", "abc", "é", "e\u0301", "😀", "x-1", "A1", "12\n", "ключ"]
STRINGS += ["b\n", "ab\n", "a\rb", "a\u2028b", "a\nb", "٣", "x-٣", "a b"]
DIALECT_STRINGS = ["a\rb", "a\u2028b", "a\nb", "ab\n", "b\n", "\r", "\u2028", "٣", "x-٣", "a b"]
# orjson's range: integers within 64 bits, finite floats.
NUMBERS = [0, 1, -1, 2, 3, 7, 0.0, -0.0, 1.0, 0.5, 1.5, 2.5, 0.3, 1e20, 2**53 + 1, -3.75]
NUMBERS += [2**63, 2**64 - 1, -(2**63), 0.1, 1e308, 9007199254740993.0]
SCALARS: list[Any] = [None, True, False, *NUMBERS, *STRINGS]
TYPES = ["object", "array", "string", "number", "integer", "null", "boolean"]
# No inline flags: jsonschema joins patternProperties keys, and "a|(?i)b" does not compile.
PATTERNS = ["^a", "b$", "", "^x-", "\\d", "é", "^[a-c]+$", "^(ab|c)$", "^a.b$", "^.$", "\\D"]
PATTERNS += ["^\\w+$", "a\\s", "^[^a]*$", "b$|^x", "a.b", "^.b"]
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
        s["multipleOf"] = self.rng.choice([1, 2, 3, 7, 1000, 0.5, 0.1, 0.25, 1.5])

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
    if "pattern" in schema and rng.random() < 0.5:
        return rng.choice(DIALECT_STRINGS)
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


def pattern_case(rng: random.Random) -> tuple[Any, list[Any]]:
    """A schema whose verdict hangs on a regular expression, with strings where dialects part.

    Half are negated, so that a pattern matching too little shows as a wrong acceptance too."""
    pattern = rng.choice(PATTERNS)
    schema: Any = rng.choice(
        [
            {"type": "string", "pattern": pattern},
            {"propertyNames": {"pattern": pattern}},
            {"patternProperties": {pattern: {"type": "integer"}}},
            {"patternProperties": {pattern: True, "^z": True}, "additionalProperties": False},
        ]
    )
    if rng.random() < 0.5:
        schema = {"not": schema}
    texts = STRINGS + DIALECT_STRINGS + KEYS
    instances: list[Any] = [rng.choice(texts) for _ in range(8)]
    instances += [{rng.choice(texts): rng.choice([1, "s"])} for _ in range(7)]
    return schema, instances


CASE_COUNT = 500  # schemas; 15 instances each
SEED = 20240601


@functools.cache
def fuzz_cases() -> list[tuple[Any, list[Any]]]:
    rng = random.Random(SEED)
    fuzzer = SchemaFuzzer(rng)
    cases = []
    for index in range(CASE_COUNT):
        if index % 8 == 7:
            cases.append(pattern_case(rng))
            continue
        draft = list(DRAFTS)[index % len(DRAFTS)]
        schema = fuzzer.schema(draft, rng.randint(0, 3), root=True)
        if draft != "2020" or rng.random() < 0.5:  # 2020-12 is also the default
            schema["$schema"] = DRAFTS[draft]
        instances = [rand_json(rng, 3) for _ in range(6)]
        instances += [guess(rng, schema, 4) for _ in range(9)]
        cases.append((schema, instances))
    return cases


def passes_meta_schema(schema: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return False
    return True


def outside_subset(schema: Any) -> bool:
    """Whether the schema is one the fast path documents it declines."""
    try:
        schemafast._Translator(schemafast._dialect(schema)).root(schema)
    except schemafast._Unsupported:
        return True
    return False


@dataclass
class Outcome:
    wrong: list[tuple[Any, Any]] = field(default_factory=list)  # the check and jsonschema differ
    total: int = 0  # checks compared
    valid: int = 0  # of which jsonschema accepted
    declined: int = 0  # schemas the fast path left to jsonschema


def differential() -> Outcome:
    """compile_check's verdicts against jsonschema's on the fuzz corpus, for the schemas
    proxy.policy loads (those that pass the meta-schema)."""
    outcome = Outcome()
    for schema, instances in fuzz_cases():
        if not passes_meta_schema(schema):
            continue
        check = compile_check(schema)
        if check is None:
            assert outside_subset(schema), f"declined a schema of the subset: {schema!r}"
            outcome.declined += 1
            continue
        for instance in instances:
            expected = js_valid(schema, instance)
            outcome.total += 1
            outcome.valid += expected
            if check(instance) is not expected:
                outcome.wrong.append((schema, instance))
    return outcome


def test_fuzz_agrees_with_jsonschema() -> None:
    outcome = differential()
    wrong, total = outcome.wrong, outcome.total
    assert not wrong, f"{len(wrong)} of {total} disagree, first: {wrong[0]!r}"
    # Bounded by count, not clock: enough schemas must reach jsonschema-rs for this to mean much.
    assert total >= 4500, outcome
    assert outcome.declined < 0.25 * (outcome.declined + total / 15), outcome
    # Both outcomes must be common, or agreement would say little.
    assert 0.2 * total < outcome.valid < 0.8 * total, outcome


def permissive_escape(pattern: str, i: int) -> str:
    return pattern[i : i + 2]


@pytest.mark.parametrize(
    ("name", "replacement"),
    [
        # Python's `$` also matches before a final newline
        ("_PY_DOLLAR", "$"),
        # Python's `.` matches \r and U+2028, jsonschema-rs's does not
        ("_PY_DOT", "."),
        # \d, \w, \s are Unicode classes in Python and ASCII ones in jsonschema-rs
        ("_escape", permissive_escape),
        # jsonschema-rs and jsonschema's float rule part ways on a float multipleOf
        ("_check_value", lambda keyword, value: None),
    ],
)
def test_fuzz_catches_each_excluded_difference(
    monkeypatch: pytest.MonkeyPatch, name: str, replacement: Any
) -> None:
    monkeypatch.setattr(schemafast, name, replacement)
    assert differential().wrong
