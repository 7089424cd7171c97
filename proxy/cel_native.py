"""CEL expressions compiled to Python functions: the fast path for the common case.

The `cel` package interprets an expression in about 9 µs, most of it converting values into
CEL; a rule such as `args.query.lowerAscii().contains("ssn")` compiled to Python runs in well
under one. Exactness comes from not trying to be complete: the compiled function only answers
when every operation saw operands whose meaning it knows (strings, in-range ints, doubles,
bools, null, JSON lists and maps). Anything else (a missing field, a type mismatch, an int
overflow, a heterogeneous list compared for equality) raises `Fallback`, and the caller asks the
interpreter, which gives the real answer or the real error message. Expressions using syntax or
functions outside the subset are not compiled at all (`compile_native` returns None).

A differential test (tests/test_cel_native.py) checks that whenever the compiled function
answers, the interpreter gives the same value of the same type.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable
from typing import Any

__all__ = ["Fallback", "compile_native"]

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
EXACT_FLOAT_INT = 2**53  # ints this small compare with doubles the same way in both engines

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


class Fallback(Exception):
    """The compiled form cannot vouch for this evaluation: ask the interpreter."""


class Unsupported(Exception):
    """The expression uses something the compiler does not translate."""


# --- lexer -------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<float>\d*\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)
  | (?P<int>0[xX][0-9a-fA-F]+[uU]?|\d+[uU]?)
  | (?P<str>[rRbB]{0,2}(?:'''|\"\"\"|'|"))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\|\||&&|==|!=|<=|>=|[<>+\-*/%!?:.,()\[\]{}])
    """,
    re.VERBOSE,
)
_SIMPLE_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "`": "`"}
_RESERVED = frozenset(
    "as break const continue else for function if import let loop package namespace return "
    "var void while".split()
)

Token = tuple[str, Any]  # (kind, value): ("int", 3), ("str", "a"), ("ident", "x"), ("op", "+")


def _string(source: str, pos: int, quote: str) -> tuple[str, int]:
    """A single-line quoted string with the common escapes; anything fancier is Unsupported."""
    out = []
    i = pos
    while i < len(source):
        ch = source[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\n":
            break
        if ch == "\\":
            nxt = source[i + 1 : i + 2]
            if nxt not in _SIMPLE_ESCAPES:
                raise Unsupported(f"escape \\{nxt}")
            out.append(_SIMPLE_ESCAPES[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise Unsupported("unterminated string")


def tokenize(source: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise Unsupported(f"character {source[pos]!r}")
        kind = match.lastgroup
        text = match.group()
        pos = match.end()
        if kind == "ws":
            continue
        if kind == "float":
            value = float(text)
            if value in (float("inf"), float("-inf")):
                raise Unsupported("float literal out of range")
            tokens.append(("lit", value))
        elif kind == "int":
            if text[-1] in "uU" or text[:2] in ("0x", "0X"):
                raise Unsupported("uint or hex literal")
            value = int(text)
            if value > INT_MAX:
                raise Unsupported("int literal out of range")
            tokens.append(("lit", value))
        elif kind == "str":
            if len(text) != 1:  # raw, bytes or triple-quoted
                raise Unsupported("string prefix or triple quotes")
            value, pos = _string(source, pos, text)
            tokens.append(("lit", value))
        elif kind == "ident":
            if text in ("true", "false"):
                tokens.append(("lit", text == "true"))
            elif text == "null":
                tokens.append(("lit", None))
            elif text == "in":
                tokens.append(("op", "in"))
            elif text in _RESERVED:
                raise Unsupported(f"reserved word {text}")
            else:
                tokens.append(("ident", text))
        else:
            tokens.append(("op", text))
    tokens.append(("end", None))
    return tokens


# --- parser: CEL's grammar, precedence lowest first ---------------------------------------------
# Node shapes: ("lit", v) ("var", name) ("member", x, field) ("index", x, key)
# ("call", name, target | None, [args]) ("list", [items]) ("map", [(k, v)]) ("not", x) ("neg", x)
# ("and", a, b) ("or", a, b) ("cond", c, a, b) ("bin", op, a, b) ("has", x, field)
# ("macro", name, target, var, body)

Node = tuple[Any, ...]
_RELATIONS = frozenset(("<", "<=", ">", ">=", "==", "!=", "in"))
_MACROS = frozenset(("exists", "all", "exists_one", "map", "filter"))
MAX_DEPTH = 64


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def accept(self, op: str) -> bool:
        if self.tokens[self.pos] == ("op", op):
            self.pos += 1
            return True
        return False

    def expect(self, op: str) -> None:
        if not self.accept(op):
            raise Unsupported(f"expected {op!r}")

    def parse(self) -> Node:
        node = self.expr()
        if self.peek()[0] != "end":
            raise Unsupported("trailing input")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Unsupported("nested too deeply")
        cond = self.or_()
        if self.accept("?"):
            yes = self.or_()
            self.expect(":")
            no = self.expr()
            cond = ("cond", cond, yes, no)
        self.depth -= 1
        return cond

    def or_(self) -> Node:
        node = self.and_()
        while self.accept("||"):
            node = ("or", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.relation()
        while self.accept("&&"):
            node = ("and", node, self.relation())
        return node

    def relation(self) -> Node:
        node = self.addition()
        while self.peek()[0] == "op" and self.peek()[1] in _RELATIONS:
            op = self.take()[1]
            node = ("bin", op, node, self.addition())
        return node

    def addition(self) -> Node:
        node = self.multiplication()
        while self.peek()[0] == "op" and self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            node = ("bin", op, node, self.multiplication())
        return node

    def multiplication(self) -> Node:
        node = self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/", "%"):
            op = self.take()[1]
            node = ("bin", op, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.accept("!"):
            return ("not", self.unary())
        if self.accept("-"):
            operand = self.unary()
            if operand[0] == "lit" and type(operand[1]) in (int, float):
                return ("lit", -operand[1])
            return ("neg", operand)
        return self.member()

    def member(self) -> Node:
        node = self.primary()
        while True:
            if self.accept("."):
                kind, name = self.take()
                if kind != "ident":
                    raise Unsupported("expected a field name")
                if self.accept("("):
                    args = self.arguments(")")
                    node = self.method(node, name, args)
                else:
                    node = ("member", node, name)
            elif self.accept("["):
                key = self.expr()
                self.expect("]")
                node = ("index", node, key)
            else:
                return node

    def method(self, target: Node, name: str, args: list[Node]) -> Node:
        if name in _MACROS:
            if len(args) != 2 or args[0][0] != "var":
                raise Unsupported(f"{name} form")
            return ("macro", name, target, args[0][1], args[1])
        return ("call", name, target, args)

    def arguments(self, close: str) -> list[Node]:
        args: list[Node] = []
        if self.accept(close):
            return args
        while True:
            args.append(self.expr())
            if self.accept(close):
                return args
            self.expect(",")

    def primary(self) -> Node:
        kind, value = self.take()
        if kind == "lit":
            return ("lit", value)
        if kind == "ident":
            if self.accept("("):
                args = self.arguments(")")
                if value == "has":
                    if len(args) != 1 or args[0][0] != "member":
                        raise Unsupported("has() form")
                    return ("has", args[0][1], args[0][2])
                return ("call", value, None, args)
            return ("var", value)
        if (kind, value) == ("op", "("):
            node = self.expr()
            self.expect(")")
            return node
        if (kind, value) == ("op", "["):
            items = []
            if not self.accept("]"):
                while True:
                    items.append(self.expr())
                    if self.accept("]"):
                        break
                    self.expect(",")
                    if self.accept("]"):  # a trailing comma
                        break
            return ("list", items)
        if (kind, value) == ("op", "{"):
            return self.map_literal()
        raise Unsupported(f"unexpected {value!r}")

    def map_literal(self) -> Node:
        entries: list[tuple[Node, Node]] = []
        seen: set[str] = set()
        if self.accept("}"):
            return ("map", entries)
        while True:
            key = self.expr()
            if key[0] != "lit" or type(key[1]) is not str or key[1] in seen:
                raise Unsupported("map key other than a distinct string literal")
            seen.add(key[1])
            self.expect(":")
            entries.append((key, self.expr()))
            if self.accept("}"):
                return ("map", entries)
            self.expect(",")
            if self.accept("}"):
                return ("map", entries)


# --- runtime helpers: each answers only for operands it understands ------------------------------


def _fallback() -> Any:
    raise Fallback


def _int_ok(v: int) -> bool:
    return INT_MIN <= v <= INT_MAX


def _kind(v: Any) -> type | None:
    """The CEL kind of a plain value (int and double together as numbers), None if unsure."""
    t = type(v)
    if t is int:
        return float if _int_ok(v) else None
    if t is float or t is str or t is bool or v is None:
        return float if t is float else t
    return None


def _num_pair(a: Any, b: Any) -> bool:
    """Both numbers that compare identically in both engines."""
    ta, tb = type(a), type(b)
    if ta is tb:
        return ta is float or (ta is int and _int_ok(a) and _int_ok(b))
    if ta is int and tb is float:
        return -EXACT_FLOAT_INT <= a <= EXACT_FLOAT_INT
    if ta is float and tb is int:
        return -EXACT_FLOAT_INT <= b <= EXACT_FLOAT_INT
    return False


def eq(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    if ta is tb and (ta is str or ta is bool or ta is float or a is None):
        return a == b
    if _num_pair(a, b):
        return a == b
    ka, kb = _kind(a), _kind(b)
    if ka is not None and kb is not None and ka is not kb:
        return False  # different kinds of scalars are simply unequal
    raise Fallback


def ne(a: Any, b: Any) -> bool:
    return not eq(a, b)


def _ordered(a: Any, b: Any) -> bool:
    ta = type(a)
    if ta is type(b) and (ta is str or ta is bool):
        return True
    # NaN has no order: the interpreter errors where Python answers False.
    return _num_pair(a, b) and a == a and b == b


def lt(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return a < b
    raise Fallback


def le(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return a <= b
    raise Fallback


def gt(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return a > b
    raise Fallback


def ge(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return a >= b
    raise Fallback


def _ints(a: Any, b: Any) -> bool:
    return type(a) is int and type(b) is int and _int_ok(a) and _int_ok(b)


def _checked(v: int) -> int:
    if INT_MIN <= v <= INT_MAX:
        return v
    raise Fallback  # overflow: an error in CEL


def add(a: Any, b: Any) -> Any:
    ta = type(a)
    if ta is type(b):
        if ta is int and _int_ok(a) and _int_ok(b):
            return _checked(a + b)
        if ta is float or ta is str or ta is list:
            return a + b
    raise Fallback


def sub(a: Any, b: Any) -> Any:
    if _ints(a, b):
        return _checked(a - b)
    if type(a) is float and type(b) is float:
        return a - b
    raise Fallback


def mul(a: Any, b: Any) -> Any:
    if _ints(a, b):
        return _checked(a * b)
    if type(a) is float and type(b) is float:
        return a * b
    raise Fallback


def div(a: Any, b: Any) -> Any:
    if _ints(a, b) and b != 0:
        q = abs(a) // abs(b)  # CEL truncates toward zero
        return _checked(-q if (a < 0) != (b < 0) else q)
    if type(a) is float and type(b) is float and b != 0.0:
        return a / b
    raise Fallback


def mod(a: Any, b: Any) -> Any:
    if _ints(a, b) and b != 0 and not (a == INT_MIN and b == -1):  # that one overflows
        r = abs(a) % abs(b)  # the remainder takes the dividend's sign
        return -r if a < 0 else r
    raise Fallback


def neg(a: Any) -> Any:
    if (type(a) is int and INT_MIN < a <= INT_MAX) or type(a) is float:
        return -a
    raise Fallback


def not_(a: Any) -> bool:
    if type(a) is bool:
        return not a
    raise Fallback


def truth(a: Any) -> bool:
    if type(a) is bool:
        return a
    raise Fallback


def in_(x: Any, container: Any) -> bool:
    tc = type(container)
    if tc is dict:
        if type(x) is str:
            return x in container
        raise Fallback
    if tc is list:
        return any(eq(x, item) for item in container)
    raise Fallback


def member(x: Any, name: str) -> Any:
    if type(x) is dict:
        try:
            return x[name]
        except KeyError:
            pass
    raise Fallback


def index(x: Any, key: Any) -> Any:
    tx = type(x)
    if tx is dict and type(key) is str:
        try:
            return x[key]
        except KeyError:
            pass
    elif tx is list and type(key) is int and 0 <= key < len(x):
        return x[key]
    raise Fallback


def has(x: Any, name: str) -> bool:
    if type(x) is dict:
        return name in x
    raise Fallback


def size(x: Any) -> int:
    t = type(x)
    if t is str:
        # The interpreter counts a string's UTF-8 bytes.
        return len(x) if x.isascii() else len(x.encode("utf-8", "surrogatepass"))
    if t is list or t is dict:
        return len(x)
    raise Fallback


def _str_pair(a: Any, b: Any) -> bool:
    return type(a) is str and type(b) is str


def contains(a: Any, b: Any) -> bool:
    if _str_pair(a, b):
        return b in a
    raise Fallback


def starts_with(a: Any, b: Any) -> bool:
    if _str_pair(a, b):
        return a.startswith(b)
    raise Fallback


def ends_with(a: Any, b: Any) -> bool:
    if _str_pair(a, b):
        return a.endswith(b)
    raise Fallback


def ascii_lower(s: str) -> str:
    """CEL's lowerAscii (only A-Z change). Also the interpreter's extension function."""
    # str.lower() is exact on ASCII text and far cheaper than a translation table.
    return s.lower() if type(s) is str and s.isascii() else s.translate(_ASCII_LOWER)


def ascii_upper(s: str) -> str:
    """CEL's upperAscii (only a-z change). Also the interpreter's extension function."""
    return s.upper() if type(s) is str and s.isascii() else s.translate(_ASCII_UPPER)


def lower_ascii(a: Any) -> str:
    if type(a) is str:
        return ascii_lower(a)
    raise Fallback


def upper_ascii(a: Any) -> str:
    if type(a) is str:
        return ascii_upper(a)
    raise Fallback


def _items(container: Any) -> list[Any] | dict[str, Any]:
    """What a macro ranges over: a list's elements, or a map's keys when there is at most one
    (the interpreter visits a map's keys in an order of its own, which can change a result)."""
    if type(container) is list or (type(container) is dict and len(container) <= 1):
        return container
    raise Fallback


def exists(container: Any, body: Callable[[Any], Any]) -> bool:
    return any(truth(body(item)) for item in _items(container))


def all_(container: Any, body: Callable[[Any], Any]) -> bool:
    return all(truth(body(item)) for item in _items(container))


def exists_one(container: Any, body: Callable[[Any], Any]) -> bool:
    return sum(truth(body(item)) for item in _items(container)) == 1


def map_(container: Any, body: Callable[[Any], Any]) -> list[Any]:
    return [body(item) for item in _items(container)]


def filter_(container: Any, body: Callable[[Any], Any]) -> list[Any]:
    return [item for item in _items(container) if truth(body(item))]


def result(v: Any) -> Any:
    """Only plain scalars leave the fast path: the interpreter converts anything else."""
    t = type(v)
    if t is bool or t is str or t is float or (t is int and _int_ok(v)) or v is None:
        return v
    raise Fallback


# --- code generation ----------------------------------------------------------------------------

_BINARY = {
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
_MACRO_HELPERS = {
    "exists": "exists",
    "all": "all_",
    "exists_one": "exists_one",
    "map": "map_",
    "filter": "filter_",
}
_HELPERS = {
    name: globals()[name]
    for name in (
        "eq ne lt le gt ge add sub mul div mod neg not_ truth in_ member index has size "
        "contains starts_with ends_with lower_ascii upper_ascii exists all_ exists_one map_ "
        "filter_ result"
    ).split()
}


class _Generator:
    def __init__(self) -> None:
        self.variables: list[str] = []  # free variables, in order of first use

    def gen(self, node: Node, bound: dict[str, str]) -> str:
        kind = node[0]
        if kind == "lit":
            return repr(node[1])
        if kind == "var":
            name = node[1]
            if name in bound:
                return bound[name]
            if name not in self.variables:
                self.variables.append(name)
            return f"v_{name}"
        if kind == "member":
            return f"member({self.gen(node[1], bound)}, {node[2]!r})"
        if kind == "index":
            return f"index({self.gen(node[1], bound)}, {self.gen(node[2], bound)})"
        if kind == "has":
            return f"has({self.gen(node[1], bound)}, {node[2]!r})"
        if kind == "not":
            return f"not_({self.gen(node[1], bound)})"
        if kind == "neg":
            return f"neg({self.gen(node[1], bound)})"
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
            if op == "in":
                return f"in_({a}, {b})"
            return f"{_BINARY[op]}({a}, {b})"
        if kind == "list":
            return "[" + "".join(self.gen(n, bound) + ", " for n in node[1]) + "]"
        if kind == "map":
            body = "".join(f"{self.gen(k, bound)}: {self.gen(v, bound)}, " for k, v in node[1])
            return "{" + body + "}"
        if kind == "call":
            return self.call(node[1], node[2], node[3], bound)
        if kind == "macro":
            name, target, var, body = node[1:]
            if var in bound or var in ("true", "false", "null"):
                raise Unsupported("shadowed macro variable")
            local = f"m{len(bound)}_{var}"
            inner = self.gen(body, {**bound, var: local})
            return f"{_MACRO_HELPERS[name]}({self.gen(target, bound)}, lambda {local}: {inner})"
        raise Unsupported(kind)

    def call(self, name: str, target: Node | None, args: list[Node], bound: dict[str, str]) -> str:
        if target is None:
            if name == "size" and len(args) == 1:
                return f"size({self.gen(args[0], bound)})"
            raise Unsupported(f"function {name}")
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


def _compile(source: str) -> Callable[[dict[str, Any]], Any] | None:
    try:
        tree = _Parser(tokenize(source)).parse()
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
    namespace: dict[str, Any] = {**_HELPERS, "fallback": _fallback}
    try:
        exec(compile("\n".join(lines), f"<cel {source[:40]!r}>", "exec"), namespace)
    except (SyntaxError, RecursionError, MemoryError):
        return None
    return namespace["evaluate"]  # type: ignore[no-any-return]
