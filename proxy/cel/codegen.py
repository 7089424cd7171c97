"""Syntax tree to Python source, compiled once per expression; and the guard that keeps the fast
path off when the installed interpreter answers differently from the operations in runtime."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import proxy.cel.runtime as runtime
from proxy.cel.parser import Node, Parser, Unsupported, tokenize
from proxy.cel.regex import compile_pattern, literal
from proxy.cel.runtime import Fallback

# --- code generation ----------------------------------------------------------------------------

# node kind -> helper, for nodes of one operand (and a field name, for member and has)
_UNARY = {"member": "member", "has": "has", "not": "not_", "neg": "neg"}
_BINARY = {
    "in": "in_",
    "==": "eq",
    "!=": "ne",
    "<": "lt",
    "<=": "le",
    ">": "gt",
    ">=": "ge",
    "+": "add",
    "-": "sub",
    "*": "mul",
    "/": "div",
    "%": "mod",
}
# method name -> (helper, number of arguments besides the target)
_METHODS = {
    "contains": ("contains", 1),
    "startsWith": ("starts_with", 1),
    "endsWith": ("ends_with", 1),
    "size": ("size", 0),
    "lowerAscii": ("lower_ascii", 0),
    "upperAscii": ("upper_ascii", 0),
}
# `matches` with a literal pattern (proxy.cel.regex.literal), by (anchored at the start, at the
# end): the string test it amounts to.
_LITERAL_MATCHES = {
    (True, True): "matches_exactly",
    (True, False): "starts_with",
    (False, True): "ends_with",
    (False, False): "contains",
}
_MACRO_HELPERS = {
    "exists": "exists",
    "all": "all_",
    "exists_one": "exists_one",
    "map": "map_",
    "filter": "filter_",
}
_HELPERS = {
    name: getattr(runtime, name)
    for name in (
        "eq ne lt le gt ge add sub mul div mod neg not_ truth in_ member index has size "
        "contains starts_with ends_with matches matches_ascii matches_exactly lower_ascii "
        "upper_ascii exists all_ exists_one map_ filter_ result"
    ).split()
}


class _Generator:
    def __init__(self) -> None:
        self.variables: list[str] = []  # free variables, in order of first use
        self.patterns: list[Callable[[str], Any]] = []  # `matches` patterns' compiled search

    def gen(self, node: Node, bound: dict[str, str]) -> str:
        """Python source for `node`; `bound` maps macro variables to their Python names."""
        kind = node[0]
        if kind == "lit":
            return repr(node[1])
        if kind == "var":
            return self.var(node[1], bound)
        if kind in _UNARY:  # ("member" | "has", x, field) and ("not" | "neg", x)
            args = [self.gen(node[1], bound), *(repr(f) for f in node[2:])]
            return f"{_UNARY[kind]}({', '.join(args)})"
        if kind == "index":
            return f"index({self.gen(node[1], bound)}, {self.gen(node[2], bound)})"
        if kind in ("and", "or"):
            # Both operands must be bools; short-circuiting agrees with CEL's, and an operand
            # the fast path cannot evaluate sends the whole expression to the interpreter.
            a, b = self.gen(node[1], bound), self.gen(node[2], bound)
            return f"(truth({a}) {kind} truth({b}))"
        if kind == "cond":
            c, a, b = (self.gen(n, bound) for n in node[1:])
            return f"({a} if truth({c}) else {b})"
        if kind == "bin":
            op, a, b = node[1], self.gen(node[2], bound), self.gen(node[3], bound)
            return f"{_BINARY[op]}({a}, {b})"
        return self.composite(node, bound)

    def var(self, name: str, bound: dict[str, str]) -> str:
        if name in bound:
            return bound[name]
        if name not in self.variables:
            self.variables.append(name)
        return f"v_{name}"

    def composite(self, node: Node, bound: dict[str, str]) -> str:
        """Literals of lists and maps, calls and macros."""
        kind = node[0]
        if kind == "list":
            return "[" + "".join(self.gen(n, bound) + ", " for n in node[1]) + "]"
        if kind == "map":
            body = "".join(f"{self.gen(k, bound)}: {self.gen(v, bound)}, " for k, v in node[1])
            return "{" + body + "}"
        if kind == "call":
            return self.call(node[1], node[2], node[3], bound)
        if kind == "macro":
            return self.macro(node, bound)
        raise Unsupported(kind)

    def pattern(self, node: Node) -> tuple[str, bool]:
        """A constant pattern, compiled now: the name its `search` has in the function, and
        whether it answers for ASCII strings only."""
        if node[0] != "lit" or type(node[1]) is not str:
            raise Unsupported("a `matches` pattern that is not a constant string")
        compiled = compile_pattern(node[1])
        if compiled is None or not _interpreter_accepts(node[1]):
            raise Unsupported(
                f"the pattern {node[1]!r} uses syntax the compiled form does not translate"
            )
        self.patterns.append(compiled[0])
        return f"pattern_{len(self.patterns) - 1}", compiled[1]

    def macro(self, node: Node, bound: dict[str, str]) -> str:
        name, target, var, body = node[1:]
        if var in bound or var in ("true", "false", "null"):
            raise Unsupported("shadowed macro variable")
        local = f"m{len(bound)}_{var}"
        inner = self.gen(body, {**bound, var: local})
        return f"{_MACRO_HELPERS[name]}({self.gen(target, bound)}, lambda {local}: {inner})"

    def call(self, name: str, target: Node | None, args: list[Node], bound: dict[str, str]) -> str:
        if target is None:
            if name == "size" and len(args) == 1:
                return f"size({self.gen(args[0], bound)})"
            raise Unsupported(f"function {name}")
        if name == "matches" and len(args) == 1:
            text = literal(args[0][1]) if args[0][0] == "lit" and type(args[0][1]) is str else None
            if text is not None:
                helper = _LITERAL_MATCHES[text[1], text[2]]
                return f"{helper}({self.gen(target, bound)}, {text[0]!r})"
            search, ascii_only = self.pattern(args[0])
            helper = "matches_ascii" if ascii_only else "matches"
            return f"{helper}({self.gen(target, bound)}, {search})"
        if name not in _METHODS or _METHODS[name][1] != len(args):
            raise Unsupported(f"method {name}")
        parts = [self.gen(target, bound), *(self.gen(a, bound) for a in args)]
        return f"{_METHODS[name][0]}({', '.join(parts)})"


# Where this module copies the interpreter rather than the CEL spec (string size in UTF-8 bytes,
# equality and order across int and double, heterogeneous equality): checked against the
# installed `cel` once, and the fast path stays off if a release behaves differently.
_SENTINELS = (
    'size("é")',
    "1 == 1.0",
    "1 < 1.5",
    "2.5 >= 2",
    "true == 1",
    '"a" == 1',
    "null == 0",
    "-7 / 2",
    "-7 % 3",
    '"abc" < "abd"',
    '"a" in ["b", 1, "a"]',
)


def _interpreter_accepts(pattern: str) -> bool:
    """Whether the interpreter compiles `pattern` (its regex crate refuses some Python's `re`
    takes): an invalid pattern must reach it, for its error."""
    import cel

    try:
        cel.compile("s.matches(p)").execute({"s": "", "p": pattern})
    except Exception:
        return False
    return True


@functools.cache
def engine_agrees() -> bool:
    """Whether the installed interpreter answers the sentinel expressions as this module does."""
    import cel  # the interpreter this module stands in for

    for source in _SENTINELS:
        native = _compile(source)
        try:
            expected = cel.compile(source).execute({})
            got = native({}) if native is not None else Fallback
        except Exception:
            return False
        if type(got) is not type(expected) or got != expected:
            return False
    return True


def compile_native(source: str) -> Callable[[dict[str, Any]], Any] | None:
    """The expression as a Python function of its environment, or None when it uses anything
    the compiler does not translate. The function raises Fallback when it cannot vouch for an
    answer; an environment value may be a zero-argument callable, called when first needed.
    """
    if not engine_agrees():
        return None
    return _compile(source)


def not_compiled_because(source: str) -> str | None:
    """Why `compile_native` leaves the expression to the interpreter, or None if it does not
    (for `callgate check`)."""
    if not engine_agrees():
        return "the installed cel package answers differently from the compiled form"
    try:
        _Generator().gen(Parser(tokenize(source)).parse(), {})
    except Unsupported as exc:
        return str(exc)
    except RecursionError:
        return "nested too deeply"
    return None


def _compile(source: str) -> Callable[[dict[str, Any]], Any] | None:
    try:
        tree = Parser(tokenize(source)).parse()
        generator = _Generator()
        body = generator.gen(tree, {})
    except (Unsupported, RecursionError):
        return None
    lines = ["def evaluate(env):"]
    for name in generator.variables:
        lines += [
            f"    v_{name} = env[{name!r}] if {name!r} in env else fallback()",
            f"    if callable(v_{name}): v_{name} = v_{name}()",
        ]
    lines.append(f"    return result({body})")
    namespace: dict[str, Any] = {**_HELPERS, "fallback": runtime.fallback}
    namespace.update((f"pattern_{i}", search) for i, search in enumerate(generator.patterns))
    try:
        exec(compile("\n".join(lines), f"<cel {source[:40]!r}>", "exec"), namespace)
    except (SyntaxError, RecursionError, MemoryError):
        return None
    evaluate: Callable[[dict[str, Any]], Any] = namespace["evaluate"]
    return evaluate
