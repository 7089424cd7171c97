"""CEL source to a syntax tree, for the subset proxy.cel compiles (anything else: Unsupported)."""

from __future__ import annotations

import re
from typing import Any

from proxy.cel.runtime import INT_MAX


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
    out: list[str] = []
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
            number = float(text)
            if number in (float("inf"), float("-inf")):
                raise Unsupported("float literal out of range")
            tokens.append(("lit", number))
        elif kind == "int":
            if text[-1] in "uU" or text[:2] in ("0x", "0X"):
                raise Unsupported("uint or hex literal")
            integer = int(text)
            if integer > INT_MAX:
                raise Unsupported("int literal out of range")
            tokens.append(("lit", integer))
        elif kind == "str":
            if len(text) != 1:  # raw, bytes or triple-quoted
                raise Unsupported("string prefix or triple quotes")
            literal, pos = _string(source, pos, text)
            tokens.append(("lit", literal))
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


class Parser:
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
