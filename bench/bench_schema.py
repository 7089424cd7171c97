"""JSON Schema check benchmark: the fast validity check against jsonschema, per check.

    python -m bench.bench_schema [--repeat 5] [--rounds 20]

Two corpora: a few typical tool schemas with valid and invalid arguments, and the seeded fuzz
corpus of the schema acceptance test (tests/test_schemacheck.py), restricted to the schemas every
engine measured here compiles. Prints microseconds per check (best of --repeat) for jsonschema
(`next(iter_errors)`, the reference and what a schema without a fast check costs), the fast
check the policy compiles (proxy.schemafast, jsonschema-rs), and proxy.schemacheck when it is
still importable (the Python code generator it replaced), so one script gives before and after.
"""

from __future__ import annotations

import argparse
import importlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import jsonschema

Check = Callable[[Any], bool]
Compiler = Callable[[Any], Check | None]

TOOL_SCHEMAS: list[tuple[Any, list[Any]]] = [
    (
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 500},
                "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
                "recency_days": {"type": "integer", "minimum": 0},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        [
            {"query": "reverse proxies in Python", "max_results": 5, "recency_days": 30},
            {"query": "x"},
            {"query": "", "max_results": 5},
            {"query": "x", "max_results": 0},
            {"query": "x", "extra": True},
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "path": {"type": "string", "pattern": "^/workspace/"},
                "content": {"type": "string"},
                "mode": {"enum": ["overwrite", "append"]},
            },
            "required": ["path", "content"],
        },
        [
            {"path": "/workspace/a.txt", "content": "hello\n" * 20, "mode": "append"},
            {"path": "/etc/passwd", "content": "x"},
            {"path": "/workspace/b", "content": "y", "mode": "delete"},
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "to": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "subject": {"type": "string"},
                "attachments": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                        "required": ["name"],
                    },
                },
            },
            "required": ["to", "subject"],
        },
        [
            {"to": ["a@example.com", "b@example.com"], "subject": "hi", "attachments": []},
            {"to": [], "subject": "hi"},
            {"to": ["a"], "subject": "s", "attachments": [{"name": "f", "size": 3}, {"size": 1}]},
        ],
    ),
]


def reference(schema: Any) -> Check:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return lambda instance: next(iter(validator.iter_errors(instance)), None) is None


def engines() -> dict[str, Compiler]:
    found: dict[str, Compiler] = {"jsonschema": reference}
    for label, module in [
        ("schemacheck.py (Python codegen)", "proxy.schemacheck"),
        ("jsonschema-rs (proxy.schemafast)", "proxy.schemafast"),
    ]:
        try:
            found[label] = importlib.import_module(module).compile_check
        except ImportError:
            pass
    return found


def per_check(checks: list[tuple[Check, list[Any]]], repeat: int, rounds: int) -> float:
    """Microseconds per check, the best of `repeat` timings of `rounds` passes."""
    count = rounds * sum(len(instances) for _, instances in checks)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(rounds):
            for check, instances in checks:
                for instance in instances:
                    check(instance)
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def measure(name: str, corpus: list[tuple[Any, list[Any]]], repeat: int, rounds: int) -> None:
    compilers = engines()
    compiled: dict[str, list[tuple[Check, list[Any]]]] = {label: [] for label in compilers}
    kept = 0
    for schema, instances in corpus:
        checks = {label: compile_fn(schema) for label, compile_fn in compilers.items()}
        if any(check is None for check in checks.values()):
            continue  # compare like with like: only schemas every engine compiles
        kept += 1
        for label, check in checks.items():
            assert check is not None
            compiled[label].append((check, instances))
    total = sum(len(instances) for _, instances in compiled["jsonschema"])
    print(f"{name}: {kept} of {len(corpus)} schemas, {total} instances")
    base = None
    for label, checks in compiled.items():
        micros = per_check(checks, repeat, rounds)
        base = base or micros
        print(f"  {label:<34} {micros:7.2f} us/check  ({base / micros:5.1f}x jsonschema)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    measure("typical tool schemas", TOOL_SCHEMAS, args.repeat, args.rounds * 10)
    from tests.test_schemacheck import fuzz_cases

    measure("fuzz corpus", fuzz_cases(), args.repeat, args.rounds)


if __name__ == "__main__":
    main()
