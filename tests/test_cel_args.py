"""CEL rules see only the fields of `args` they read; the verdicts cannot tell the difference."""

from __future__ import annotations

import random
from typing import Any

import pytest

from proxy.policy import Expr, args_fields


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ('args.query.lowerAscii().contains("ssn")', {"query"}),
        ("has(args.path) && args.path.startsWith('/etc') || args.mode == 'w'", {"path", "mode"}),
        ("args.a.b.c == 1 && principal == 'x'", {"a"}),
        ("args . spaced == 1", {"spaced"}),
        ("args.q == 'args.hidden' + \"it's args.x\"", {"q"}),
        ('r"""args.raw""" == args.z', {"z"}),
        ("myargs.x == 1 && args.y", {"y"}),
        # Any other use of `args` gets all of it.
        ('args["q"] == 1', None),
        ("size(args) > 2", None),
        ("args.items.exists(args, args == 1)", None),
        ("[args][0].q == 1", None),
        ("args == {}", None),
        ('"unterminated == args.a', None),
    ],
)
def test_args_fields(source: str, fields: set[str] | None) -> None:
    found = args_fields(source)
    assert found == (frozenset(fields) if fields is not None else None)


EXPRESSIONS = [
    'args.query.lowerAscii().contains("ssn")',
    "has(args.path) && args.path.startsWith('/etc')",
    "has(args.missing)",
    "args.n > 3 || args.tags.exists(t, t == 'x')",
    "args.nested.deep.value == 'v'",
    "size(args) > 3",
    'args["query"] == "q"',
    "args.query == principal",
]


def _random_args(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("query", "path", "n", "tags", "nested", "extra1", "extra2", "blob"):
        if rng.random() < 0.7:
            out[key] = {
                "query": lambda: rng.choice(["q", "my SSN", "hello", "u1"]),
                "path": lambda: rng.choice(["/etc/passwd", "/tmp/x", ""]),
                "n": lambda: rng.randint(0, 6),
                "tags": lambda: rng.sample(["x", "y", "z"], rng.randint(0, 3)),
                "nested": lambda: {"deep": {"value": rng.choice(["v", "w"])}},
            }.get(key, lambda: "x" * rng.randint(0, 2000))()
    return out


def _outcome(expr: Expr, env: dict[str, Any]) -> Any:
    try:
        return ("value", expr.run(env))
    except Exception as exc:
        return ("error", type(exc).__name__)


def test_pruned_args_give_the_same_verdicts() -> None:
    rng = random.Random(11)
    for source in EXPRESSIONS:
        pruned = Expr.compile(source)
        whole = Expr(pruned.program, pruned.variables, pruned.functions, None)
        for _ in range(150):
            env = {"args": _random_args(rng), "principal": rng.choice(["u1", "u2"])}
            assert _outcome(pruned, env) == _outcome(whole, env), (source, env)
