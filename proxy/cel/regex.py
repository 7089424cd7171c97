"""CEL's `matches` on the fast path: an RE2 pattern, when it is in a subset whose meaning Python's
`re` shares, compiled once when the policy loads.

The interpreter (`cel`, on Rust's regex crate) compiles the pattern on every evaluation: under
streaming load one `matches` rule cost about 60 µs of CPU per request. Python's `re` reads most
RE2 syntax alike, but not all of it: `$` also matches before a final newline, `\\d`, `\\w`,
`\\s` and case folding differ at the edges of Unicode, RE2's classes know `[[:alpha:]]` and
set operations (`&&`, `--`, `~~`), Python knows lookarounds and backreferences RE2 refuses.
So `translate` accepts only literals, escaped punctuation, `.`, anchors (`^` -> `\\A`,
`$` -> `\\Z`), classes of literals and ranges, groups (plain and `(?:`), alternation and the
greedy or lazy quantifiers `* + ? {n} {n,} {n,m}`; anything else leaves the rule to the
interpreter. tests/test_cel_native.py holds the two engines to agreement on generated
patterns and strings.
"""

from __future__ import annotations

import re

_REPEAT = re.compile(r"\{(\d{1,3})(,(\d{1,3})?)?\}")
_CLASS_SPECIAL = frozenset("[]\\-&~^")


def _escaped(pattern: str, i: int) -> str | None:
    """The escape at pattern[i] (a backslash) as Python source, if it is escaped punctuation."""
    if i + 1 >= len(pattern):
        return None
    char = pattern[i + 1]
    if char.isascii() and not char.isalnum() and not char.isspace():
        return "\\" + char
    return None  # \d \w \s \b \A \z \pL \x41 \Q ...: outside the subset


def _class(pattern: str, i: int) -> tuple[str, int] | None:
    """The class starting at pattern[i] ("[") as Python source, and the index after it."""
    out = ["["]
    i += 1
    if i < len(pattern) and pattern[i] == "^":
        out.append("^")
        i += 1
    items = 0
    while i < len(pattern) and pattern[i] != "]":
        if pattern[i] == "-" and (not items or pattern.startswith("-]", i)):
            out.append("\\-")  # first or last: a literal hyphen in both
            i += 1
            items += 1
            continue
        low, i = _class_char(pattern, i)
        if low is None:
            return None
        if i + 1 < len(pattern) and pattern[i] == "-" and pattern[i + 1] != "]":
            high, i = _class_char(pattern, i + 1)
            if high is None or _value(low) > _value(high):
                return None
            out.append(f"{low}-{high}")
        else:
            out.append(low)
        items += 1
    if i >= len(pattern) or not items:
        return None  # unterminated, or `[]...`/`[^]...` (read differently by the two)
    out.append("]")
    return "".join(out), i + 1


def _class_char(pattern: str, i: int) -> tuple[str | None, int]:
    char = pattern[i]
    if char == "\\":
        escaped = _escaped(pattern, i)
        return escaped, i + 2
    if char in _CLASS_SPECIAL:
        return None, i + 1  # `[` nesting, set operations, a bare `-` or `^`: not translated
    return re.escape(char), i + 1


def _value(item: str) -> int:
    """The code point a class item (a possibly escaped single character) stands for."""
    return ord(item[-1])


def _quantifier(pattern: str, i: int) -> tuple[str, int] | None:
    """The quantifier at pattern[i] (`*`, `+`, `?` or `{...}`, maybe lazy) and the index after."""
    if pattern[i] == "{":
        match = _REPEAT.match(pattern, i)
        if match is None:
            return None
        high = match.group(3)
        if high is not None and int(high) < int(match.group(1)):
            return None
        source, i = match.group(0), match.end()
    else:
        source, i = pattern[i], i + 1
    if i < len(pattern) and pattern[i] == "?":
        return source + "?", i + 1  # lazy: the same strings match, only where differs
    return source, i


# What a single character stands for: (Python source, whether a quantifier may follow it).
_SINGLE = {
    "|": ("|", False),
    "^": (r"\A", False),
    "$": (r"\Z", False),  # RE2's `$` without (?m); Python's `$` also matches before "\n"
    ".": (".", True),
}


def _atom(pattern: str, i: int, depth: int) -> tuple[str, int, bool, int] | None:
    """The piece at pattern[i] that is not a quantifier: (Python source, the index after it,
    whether a quantifier may follow, the group depth after it)."""
    char = pattern[i]
    if char == "\\":
        escaped = _escaped(pattern, i)
        return None if escaped is None else (escaped, i + 2, True, depth)
    if char == "[":
        found = _class(pattern, i)
        return None if found is None else (found[0], found[1], True, depth)
    if char == "(":
        if pattern.startswith("(?:", i):
            return "(?:", i + 3, False, depth + 1
        if pattern.startswith("(?", i):
            return None  # flags, named groups, lookarounds
        return "(", i + 1, False, depth + 1
    if char == ")":
        return None if depth == 0 else (")", i + 1, True, depth - 1)
    if char in _SINGLE:
        source, can_repeat = _SINGLE[char]
        return source, i + 1, can_repeat, depth
    if char in "]}":
        return None  # a literal in RE2, an error or a literal in Python: left alone
    return re.escape(char), i + 1, True, depth


def translate(pattern: str) -> re.Pattern[str] | None:
    """`pattern` (RE2 syntax) compiled by Python's `re`, or None outside the common subset."""
    out: list[str] = []
    i, depth = 0, 0
    can_repeat = False  # whether a quantifier may follow what came last
    while i < len(pattern):
        if pattern[i] in "*+?{":
            if not can_repeat:
                return None  # nothing to repeat, or a quantifier after a quantifier
            quantified = _quantifier(pattern, i)
            if quantified is None:
                return None
            out.append(quantified[0])
            i, can_repeat = quantified[1], False
            continue
        atom = _atom(pattern, i, depth)
        if atom is None:
            return None
        source, i, can_repeat, depth = atom
        if source == ")" and out[-1] in ("(", "(?:", "|"):
            return None  # an empty group or branch
        out.append(source)
    if depth:
        return None
    try:
        return re.compile("".join(out))
    except (re.error, RecursionError, OverflowError):
        return None
