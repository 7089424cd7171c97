"""CEL's `matches` on the fast path: a constant RE2 pattern compiled once, when the policy loads,
by Google's RE2 (`google-re2`), when it keeps to the syntax both RE2 and the interpreter's
engine read alike.

Why: the interpreter (`cel`, on Rust's regex crate) compiles the pattern on every evaluation;
under streaming load one `matches` rule cost about 60 µs of CPU per request, against about
1 µs compiled once. Why RE2 and not Python's `re`: matching an attacker's arguments must take
linear time, as it does in the interpreter. `re` backtracks: `x.*y` over 20,000 `x` took 0.14 s,
and it grows with the square of the length (nested quantifiers: exponentially).

RE2 and Rust's regex crate share their syntax but not every meaning: `\\d`, `\\w`, `\\s`, `\\b` are
ASCII in RE2 and Unicode in Rust, case folding differs beyond ASCII, and Rust's classes know set
operations (`&&`, `--`, `~~`). `read` accepts literals, escaped punctuation, `.`, `^` and `$`,
classes of literals and ranges, groups (plain and `(?:`), alternation and the quantifiers
`* + ? {n} {n,} {n,m}` (greedy or lazy); a pattern with anything else stays with the
interpreter. The Perl classes (`\\d \\w \\s \\b` and their negations) and a leading `(?i)` on an
ASCII pattern mean the same in both engines over ASCII text only (RE2's `\\s` lacks the vertical
tab: written out here): such a pattern answers only for an ASCII string, and leaves any other
to the interpreter. tests/test_cel_native.py holds the two engines to agreement on generated
patterns and strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

try:  # a wheel for the common platforms; without it every `matches` stays interpreted
    import re2
except ImportError:  # pragma: no cover - the package is a dependency
    re2 = None

_REPEAT = re.compile(r"\{(\d{1,3})(,(\d{1,3})?)?\}")
_CLASS_SPECIAL = frozenset("[]\\-&~^")


# Perl classes outside brackets: the same in both engines over ASCII text. RE2's \s is
# [\t\n\f\r ], Rust's also has the vertical tab: written out for RE2.
_PERL = {"d": r"\d", "w": r"\w", "b": r"\b", "s": r"[\t\n\x0B\f\r ]"}
_PERL.update({k.upper(): v.replace("[", "[^") if k == "s" else v.upper() for k, v in _PERL.items()})


# Escapes of punctuation that are assertions in Rust's regex crate and literals in RE2: `\<`
# and `\>` (start and end of a word).
_ASSERTIONS = frozenset("<>")


def _escape_end(pattern: str, i: int) -> int | None:
    """After the escape at pattern[i] (a backslash), if it is escaped punctuation both engines
    read as the literal character."""
    if i + 1 < len(pattern):
        char = pattern[i + 1]
        if char.isascii() and not char.isalnum() and not char.isspace():
            return None if char in _ASSERTIONS else i + 2
    return None  # \d \w \s \b \A \z \pL \x41 \Q ...: outside the subset


def _class_char(pattern: str, i: int) -> tuple[str, int] | None:
    """A class member at pattern[i]: (the character it stands for, the index after it)."""
    char = pattern[i]
    if char == "\\":
        end = _escape_end(pattern, i)
        return None if end is None else (pattern[i + 1], end)
    if char in _CLASS_SPECIAL:
        return None  # `[` nesting, set operations, a bare `-` or `^`
    return char, i + 1


def _class_end(pattern: str, i: int) -> int | None:
    """After the class starting at pattern[i] ("["), if it is in the subset."""
    i += 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    items = 0
    while i < len(pattern) and pattern[i] != "]":
        items += 1
        if pattern[i] == "-" and (items == 1 or pattern.startswith("-]", i)):
            i += 1  # first or last: a literal hyphen in both
            continue
        low = _class_char(pattern, i)
        if low is None:
            return None
        i = low[1]
        if i + 1 < len(pattern) and pattern[i] == "-" and pattern[i + 1] != "]":
            high = _class_char(pattern, i + 1)
            if high is None or low[0] > high[0]:
                return None
            i = high[1]
    if i >= len(pattern) or not items:
        return None  # unterminated, or `[]...`/`[^]...` (read differently by the two)
    return i + 1


def _quantifier_end(pattern: str, i: int) -> int | None:
    """After the quantifier at pattern[i] (`*`, `+`, `?` or `{...}`, maybe lazy)."""
    if pattern[i] == "{":
        match = _REPEAT.match(pattern, i)
        if match is None:
            return None
        high = match.group(3)
        if high is not None and int(high) < int(match.group(1)):
            return None
        i = match.end()
    else:
        i += 1
    return i + 1 if i < len(pattern) and pattern[i] == "?" else i


def _atom_end(pattern: str, i: int, depth: int) -> tuple[int, bool, int] | None:
    """After the piece at pattern[i] that is not a quantifier: (the index after it, whether a
    quantifier may follow, the group depth after it)."""
    char = pattern[i]
    if char == "\\":
        end = _escape_end(pattern, i)
        return None if end is None else (end, True, depth)
    if char == "[":
        end = _class_end(pattern, i)
        return None if end is None else (end, True, depth)
    if char == "(":
        if pattern.startswith("(?:", i):
            return i + 3, False, depth + 1
        if pattern.startswith("(?", i):
            return None  # flags, named groups, lookarounds
        return i + 1, False, depth + 1
    if char == ")":
        if depth == 0 or pattern[i - 1] in "(|:":
            return None  # unbalanced, or an empty group or branch (and `(?:)`)
        return i + 1, True, depth - 1
    if char in "|^$":
        return i + 1, False, depth
    if char in "]}":
        return None  # a literal in one engine, an error in the other
    return i + 1, True, depth  # `.` or a literal


def read(pattern: str) -> tuple[str, bool] | None:
    """`pattern` as RE2 should read it, and whether it means the same in both engines over
    ASCII strings only; None when it leaves the syntax both read alike."""
    out: list[str] = []
    ascii_only = pattern.startswith("(?i)")
    if ascii_only and not pattern.isascii():
        return None  # case folding beyond ASCII differs
    i, depth = (4, 0) if ascii_only else (0, 0)
    out.append(pattern[:i])
    can_repeat = False  # whether a quantifier may follow what came last
    while i < len(pattern):
        end: int | None
        if pattern[i] in "*+?{":
            if not can_repeat:
                return None  # nothing to repeat, or a quantifier after a quantifier
            end, can_repeat = _quantifier_end(pattern, i), False
        elif pattern[i] == "\\" and pattern[i + 1 : i + 2] in _PERL:
            ascii_only = True
            out.append(_PERL[pattern[i + 1]])
            i, can_repeat = i + 2, pattern[i + 1] not in "bB"
            continue
        else:
            atom = _atom_end(pattern, i, depth)
            if atom is None:
                return None
            end, can_repeat, depth = atom
        if end is None:
            return None
        out.append(pattern[i:end])
        i = end
    return ("".join(out), ascii_only) if depth == 0 else None


_META = frozenset(".[](){}|*+?^$\\")


def literal(pattern: str) -> tuple[str, bool, bool] | None:
    """A pattern of literal characters only, perhaps anchored by a leading `^` and a trailing
    `$`: (the text, anchored at the start, anchored at the end); None for anything else.

    Such a pattern is a prefix, suffix, substring or equality test, which str's own methods
    answer without a regex engine (about a tenth of RE2's call through its Python wrapper). In
    both engines `^` and `$` (no flags) mean the very start and end of the text, not of a line.
    """
    start = pattern.startswith("^")
    i, end, text = int(start), len(pattern), []
    anchored_end = False
    while i < end:
        char = pattern[i]
        if char == "\\":
            after = _escape_end(pattern, i)
            if after is None:
                return None
            text.append(pattern[i + 1])
            i = after
        elif char == "$" and i == end - 1:
            anchored_end = True
            i += 1
        elif char in _META:
            return None
        else:
            text.append(char)
            i += 1
    return "".join(text), start, anchored_end


def compile_pattern(pattern: str) -> tuple[Callable[[str], Any], bool] | None:
    """The pattern's `search`, compiled once by RE2, and whether it may answer for ASCII strings
    only; None: outside the subset, or no RE2."""
    found = read(pattern)
    if re2 is None or found is None:
        return None
    try:
        search: Callable[[str], Any] = re2.compile(found[0]).search
    except Exception:  # re2.error: a pattern RE2 refuses goes to the interpreter's error
        return None
    return search, found[1]
