"""The compiled fast path for CEL answers exactly as the interpreter does, or not at all."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import cel
import pytest

from proxy.cel import Fallback, codegen, compile_native
from proxy.policy import FUNCTIONS, Expr


def interpret(source: str, env: dict[str, Any]) -> Any:
    program = cel.compile(source)
    return program.execute(cel.Context(variables=env, functions=FUNCTIONS))


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type, all the way down (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


ENV = {
    "args": {
        "query": "Tell me the SSN of Bob",
        "path": "/etc/passwd",
        "n": 7,
        "f": 2.5,
        "ok": True,
        "tags": ["x", "y"],
        "nums": [1, 2, 3],
        "nested": {"deep": {"value": "v"}},
        "none": None,
        "big": 2**64,
        "uni": "héllo",
    },
    "tool": "search_web",
    "principal": "alice",
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('args.query.lowerAscii().contains("ssn")', True),
        ("has(args.path) && args.path.startsWith('/etc')", True),
        ("has(args.missing) || args.n > 3", True),
        ("args.n / 2 == 3 && args.n % 4 == 3 && -args.n / 2 == -3 && -args.n % 4 == -3", True),
        ("args.f * 2.0 == 5.0 && args.n + 1 == 8 && args.n == 7.0", True),
        ("args.tags.exists(t, t == 'y') && args.nums.all(n, n > 0)", True),
        ("args.nums.exists_one(n, n > 2) && args.nums.map(n, n * 2)[2] == 6", True),
        ("args.nums.filter(n, n % 2 == 1) == [1, 3]", None),  # list equality: interpreter
        ("'x' in args.tags && !('z' in args.tags) && 'deep' in args.nested", True),
        ("args.nested.deep.value == 'v' && args['nested']['deep'].value == 'v'", True),
        ("args.none == null && args.ok == true && args.ok != 1", True),
        ("size(args.uni) == 6 && args.uni.size() == 6 && size(args.tags) == 2", True),
        ("tool == 'search_web' ? principal : 'nobody'", "alice"),
        ("args.n - 10", -3),
        ("args.f / 2.0", 1.25),
        ('"a\\"b" + \'c\\n\'', 'a"bc\n'),
        ("-9223372036854775807 - 1 < 0", True),
        ("args.n < 7.5 && 2 < args.f", True),
        ("{'a': args.n}.a == 7 && [1, 2,][1] == 2", True),
    ],
)
def test_fast_path_answers(source: str, expected: Any) -> None:
    native = compile_native(source)
    assert native is not None, source
    reference = interpret(source, ENV)
    if expected is None:
        with pytest.raises(Fallback):
            native(ENV)
        return
    assert same(native(ENV), expected)
    assert same(reference, expected)
    assert same(Expr.compile(source).run(ENV), expected)


@pytest.mark.parametrize(
    "source",
    [
        "args.missing == 1",  # no such key: the interpreter words the error
        "args.big > 1",  # beyond int64: the interpreter makes it a double
        "args.n + args.f",  # no int + double overload
        "args.n / 0",
        "9223372036854775807 + args.n",  # overflow
        "args.tags[5] == 'x'",
        "args.query && true",  # not a bool
        "args.tags == ['x', 'y']",  # container equality
        "args.nested",  # a map result: the interpreter converts it
        "nope == 1",  # undeclared variable
        "(-9223372036854775807 - 1) % -1 == 0",  # the one int remainder that overflows
        "args.f * 1e308 * 10.0 * 0.0 > 1.0",  # NaN has no order: the interpreter errors
    ],
)
def test_fast_path_defers_what_it_cannot_vouch_for(source: str) -> None:
    native = compile_native(source)
    assert native is not None
    with pytest.raises(Fallback):
        native(ENV)
    expr = Expr.compile(source)
    try:
        expected = ("value", interpret(source, ENV))
    except Exception as exc:
        expected = ("error", str(exc))
    try:
        got = ("value", expr.run(ENV))
    except Exception as exc:
        got = ("error", str(exc))
    assert got[0] == expected[0]
    assert got[0] == "error" or same(got[1], expected[1])


@pytest.mark.parametrize(
    "source",
    [
        "args.path.matches(args.query)",  # a pattern known only when it runs
        "args.path.matches('(?i)été')",  # case folding beyond ASCII differs
        "args.path.matches('[\\\\d]')",  # a Perl class inside brackets
        "args.path.matches('\\\\<rm\\\\>')",  # word boundaries in Rust, literals in RE2
        "args.path.matches('[[:alpha:]]')",
        "args.path.matches('[a-z&&[^aeiou]]')",
        "args.path.matches('(a)\\\\1')",  # a backreference: the interpreter's error
        "args.path.matches('a(?=b)')",
        "1u == args.n",
        "b'abc' == args.x",
        "r'raw' == args.x",
        "'''triple''' == args.x",
        "'\\x41' == args.x",
        "0x10 == args.n",
        "int(args.f) == 2",
        "timestamp('2024-01-01T00:00:00Z') > now",
        "args.nums.map(n, n > 1, n * 2)",
        "args.items.exists(x, x.exists(x, x))",
        "{1: 2}[1] == 2",
        "{'a': 1, 'a': 2}",
        "google.protobuf.Value{}",
    ],
)
def test_outside_the_subset_is_not_compiled(source: str) -> None:
    assert compile_native(source) is None


@pytest.mark.parametrize(
    "source",
    [
        # The interpreter visits a map's keys in an order of its own (it varies between
        # processes), so a macro over a map of several keys is left to it.
        "{'a': 1, 'b': 2}.map(k, k)[0] == 'a'",
        "{'a': 1, 'b': 2}.exists(k, k == 'a' || 1 / 0 == 1)",
        "args.nested.all(k, k != '')",
    ],
)
def test_macros_over_maps_of_several_keys_are_left_to_the_interpreter(source: str) -> None:
    native = compile_native(source)
    assert native is not None
    with pytest.raises(Fallback):
        native({**ENV, "args": {**ENV["args"], "nested": {"x": 1, "y": 2}}})
    assert compile_native("{'a': 1}.exists(k, k == 'a')")(ENV) is True  # type: ignore[misc]


def test_fast_path_stays_off_when_the_interpreter_behaves_differently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert codegen.engine_agrees()
    # As if a release of `cel` counted a string's size in code points, as the spec says.
    monkeypatch.setattr(codegen, "_compile", lambda source: lambda env: 1)
    codegen.engine_agrees.cache_clear()
    try:
        assert not codegen.engine_agrees()
        assert compile_native("args.n > 1") is None
        assert Expr.compile("args.n > 1").native is None
        assert Expr.compile("args.n > 1").run(ENV) is True  # the interpreter answers
    finally:
        monkeypatch.undo()
        codegen.engine_agrees.cache_clear()
    assert compile_native("args.n > 1") is not None


def test_lazy_variables_are_called_only_when_read() -> None:
    calls = []

    def request() -> dict[str, Any]:
        calls.append(1)
        return {"model": "gpt-x"}

    env = {**ENV, "request": request}
    native = compile_native("args.n > 1")
    assert native is not None and native(env) is True
    assert calls == []
    native = compile_native("request.model == 'gpt-x'")
    assert native is not None and native(env) is True
    assert calls == [1]


# --- differential: random expressions over random environments --------------------------------

STRINGS = ["", "a", "ssn", "SSN", "/etc", "héllo", "it's", 'q"uote', "x y", "Ünï"]
NAMES = ["query", "path", "n", "f", "ok", "tags", "nums", "mixed", "nested", "none", "big"]


def random_env(rng: random.Random) -> dict[str, Any]:
    ints = [0, 1, -1, 7, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64]
    args: dict[str, Any] = {}
    makers = {
        "query": lambda: rng.choice(STRINGS),
        "path": lambda: rng.choice(STRINGS),
        "n": lambda: rng.choice(ints),
        "f": lambda: rng.choice([0.0, -0.0, 1.5, 2.0, 1e300, -3.25, 2.0**53]),
        "ok": lambda: rng.choice([True, False]),
        "tags": lambda: rng.sample(STRINGS, rng.randint(0, 3)),
        "nums": lambda: [rng.choice(ints[:5]) for _ in range(rng.randint(0, 4))],
        "mixed": lambda: [rng.choice([1, 1.0, True, "1", None, [1], {"a": 1}])],
        "nested": lambda: {"deep": {"value": rng.choice(["v", 1, None])}, "k": "a"},
        "none": lambda: None,
        "big": lambda: rng.choice(ints),
    }
    for name, make in makers.items():
        if rng.random() < 0.85:
            args[name] = make()
    return {"args": args, "tool": rng.choice(["search_web", "Shell"]), "principal": "p"}


class Gen:
    """Random CEL source. Each branch builds only the alternative it picks (`one`): building
    every alternative and keeping one, as a plain `pick` of f-strings would, gives the same
    distribution but costs a tree per discarded branch, exponential in the depth."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, *options: Any) -> Any:
        return self.rng.choice(options)

    def one(self, *makers: Callable[[], str]) -> str:
        return self.rng.choice(makers)()

    def any(self, d: int) -> str:
        return getattr(self, self.pick("bool", "int", "float", "str", "list", "map"))(d)

    def field(self) -> str:
        return f"args.{self.pick(*NAMES)}"

    def str(self, d: int) -> str:
        r = self.rng
        if d <= 0 or r.random() < 0.35:
            return self.pick(repr(r.choice(STRINGS)), "args.query", "args.path", "tool")
        return self.one(
            lambda: f"({self.str(d - 1)} + {self.str(d - 1)})",
            lambda: f"{self.str(d - 1)}.lowerAscii()",
            lambda: f"{self.str(d - 1)}.upperAscii()",
            lambda: f"({self.bool(d - 1)} ? {self.str(d - 1)} : {self.str(d - 1)})",
            lambda: "args.nested.deep.value",
            lambda: "args.tags[0]",
            self.field,
        )

    def int(self, d: int) -> str:
        r = self.rng
        if d <= 0 or r.random() < 0.3:
            return self.one(
                lambda: str(r.choice([0, 1, 2, 3, 7, 9223372036854775807])),
                lambda: str(-r.randint(0, 9)),
                lambda: "args.n",
                lambda: "args.big",
            )
        op = self.pick("+", "-", "*", "/", "%")
        return self.one(
            lambda: f"({self.int(d - 1)} {op} {self.int(d - 1)})",
            lambda: f"-{self.int(d - 1)}",
            lambda: f"size({self.pick(self.str, self.list, self.map)(d - 1)})",
            lambda: f"{self.str(d - 1)}.size()",
            lambda: f"args.nums[{self.int(d - 1)}]",
            self.field,
        )

    def float(self, d: int) -> str:
        if d <= 0 or self.rng.random() < 0.4:
            return self.pick("1.5", "0.0", "2.0", "-2.5", "1e3", "args.f")
        op = self.pick("+", "-", "*", "/")
        other = self.one(lambda: self.float(d - 1), lambda: self.int(d - 1))
        return f"({self.float(d - 1)} {op} {other})"

    def bool(self, d: int) -> str:
        r = self.rng
        if d <= 0 or r.random() < 0.2:
            return self.one(
                lambda: "true", lambda: "false", lambda: "args.ok", lambda: f"has({self.field()})"
            )
        scalar = self.pick(self.int, self.float, self.str, self.bool)
        other = self.pick(scalar, self.any) if r.random() < 0.8 else self.any
        rel = self.pick("==", "!=", "<", "<=", ">", ">=")
        return self.one(
            lambda: f"({scalar(d - 1)} {rel} {other(d - 1)})",
            lambda: f"({self.bool(d - 1)} && {self.bool(d - 1)})",
            lambda: f"({self.bool(d - 1)} || {self.bool(d - 1)})",
            lambda: f"!{self.bool(d - 1)}",
            lambda: f"({scalar(d - 1)} in {self.list(d - 1)})",
            lambda: f"({self.str(d - 1)} in {self.map(d - 1)})",
            lambda: f"{self.str(d - 1)}.contains({self.str(d - 1)})",
            lambda: f"{self.str(d - 1)}.startsWith({self.str(d - 1)})",
            lambda: f"{self.str(d - 1)}.endsWith({self.str(d - 1)})",
            lambda: f"{self.list(d - 1)}.exists(e, {self.loop_body(d - 1)})",
            lambda: f"{self.list(d - 1)}.all(e, {self.loop_body(d - 1)})",
            lambda: f"{self.list(d - 1)}.exists_one(e, {self.loop_body(d - 1)})",
            lambda: f"({self.bool(d - 1)} ? {self.bool(d - 1)} : {self.bool(d - 1)})",
            self.field,
        )

    def loop_body(self, d: int) -> str:
        return self.one(
            lambda: f"e == {self.any(d)}",
            lambda: "e > 1",
            lambda: f"e.startsWith({self.str(d)})",
            lambda: self.bool(d),
        )

    def list(self, d: int) -> str:
        if d <= 0 or self.rng.random() < 0.4:
            return self.pick("[]", "[1, 2]", "['a', 'ssn']", "args.tags", "args.nums", "args.mixed")
        return self.one(
            lambda: f"[{self.any(d - 1)}, {self.any(d - 1)}]",
            lambda: f"({self.list(d - 1)} + {self.list(d - 1)})",
            lambda: f"{self.list(d - 1)}.map(e, {self.mapper(d - 1)})",
            lambda: f"{self.list(d - 1)}.filter(e, {self.loop_body(d - 1)})",
        )

    def mapper(self, d: int) -> str:
        return self.one(lambda: "e", lambda: "e + e", lambda: self.any(d))

    def map(self, d: int) -> str:
        if d <= 0 or self.rng.random() < 0.5:
            return self.pick("{}", "args.nested", "{'a': 1, 'ssn': 'x'}")
        return f"{{'k': {self.any(d - 1)}, 'a': {self.any(d - 1)}}}"


# Bounded by a count of expressions from a fixed seed, not by a clock: every run, on any
# machine, checks the same cases.
CASE_COUNT = 4000
SEED = 20261125


def test_differential_against_the_interpreter() -> None:
    rng = random.Random(SEED)
    gen = Gen(rng)
    compiled = answered = 0
    for i in range(CASE_COUNT):
        source = gen.any(rng.randint(1, 4))
        try:
            cel.compile(source)
        except Exception:
            continue  # the generator wrote something CEL itself rejects
        native = compile_native(source)
        if native is None:
            continue
        compiled += 1
        for _ in range(3):
            env = random_env(rng)
            try:
                got = native(env)
            except Fallback:
                continue
            answered += 1
            try:
                expected = interpret(source, env)
            except Exception as exc:
                pytest.fail(f"#{i} {source!r} on {env}: native {got!r}, interpreter {exc}")
            assert same(got, expected), f"#{i} {source!r} on {env}: {got!r} != {expected!r}"
    # The test means something only if the fast path actually answers most of the time.
    assert compiled > 1000
    assert answered > 1500


# --- matches: RE2 patterns on the fast path (proxy.cel.regex) ------------------------------------

PATTERN_PIECES = [
    "a",
    "b",
    "é",
    " ",
    "\n",
    "\\.",
    "\\$",
    "\\(",
    "\\\\",
    ".",
    "[ab]",
    "[^a]",
    "[a-c]",
    "[\\.x]",
    "[a-]",
    "[-b]",
    "[é-ü]",
    "^",
    "$",
    "\\-",
]
# Pieces outside the subset: each pattern holding one must be left to the interpreter.
OUTSIDE = [
    "\\<",
    "\\>",
    "(?s)",
    "[[:alpha:]]",
    "[a&&b]",
    "(?=a)",
    "\\x41",
    "[]a]",
    "[\\d]",
    "\\pL",
    "\\A",
]
# Perl classes: compiled, answering for ASCII strings only.
PERL = ["\\d", "\\w", "\\s", "\\b", "\\D", "\\W", "\\S", "\\B"]
QUANTIFIERS = ["*", "+", "?", "{2}", "{1,2}", "{0,}", "*?", "+?", "??", "{1,3}?"]
# ASCII and not: accented letters, an Arabic-Indic digit, the vertical tab RE2's \s lacks.
HAYSTACK = "ab$(.\n é\\-xüA1_\t\x0b\u0663K\u212a"


def random_pattern(rng: random.Random, depth: int = 0) -> tuple[str, bool, bool]:
    """A pattern, whether it holds a piece outside the subset, and whether a Perl class."""
    parts, outside, perl = [], False, False
    for _ in range(rng.randint(0, 4)):
        roll = rng.random()
        if roll < 0.12 and depth < 2:
            branches = [random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3))]
            piece = rng.choice(["(", "(?:"]) + "|".join(b[0] for b in branches) + ")"
            outside = outside or any(b[1] for b in branches)
            perl = perl or any(b[2] for b in branches)
        elif roll < 0.16:
            piece, outside = rng.choice(OUTSIDE), True
        elif roll < 0.26:
            piece, perl = rng.choice(PERL), True
        else:
            piece = rng.choice(PATTERN_PIECES)
        if rng.random() < 0.3:
            piece += rng.choice(QUANTIFIERS)
        parts.append(piece)
    pattern = "".join(parts)
    if depth == 0 and rng.random() < 0.15:
        pattern = "(?i)" + pattern  # compiled only when the pattern is ASCII
    return pattern, outside, perl


def test_matches_fast_path_agrees_with_the_interpreter() -> None:
    """Generated patterns (some outside the subset) against generated strings: whenever
    proxy.cel.regex compiles a pattern the interpreter accepts, the two engines agree on every
    string it answers for; a pattern holding a piece outside the subset is never compiled, and
    one that needs ASCII text (Perl classes, `(?i)`) leaves every other string to the
    interpreter."""
    from proxy.cel.regex import compile_pattern
    from proxy.cel.runtime import matches, matches_ascii

    rng = random.Random(SEED)
    program = cel.compile("s.matches(p)")
    compiled_count = checks = hits = deferred = 0
    for _ in range(2500):
        pattern, outside, perl = random_pattern(rng)
        compiled = compile_pattern(pattern)
        if outside or (pattern.startswith("(?i)") and not pattern.isascii()):
            assert compiled is None, pattern
        if compiled is None:
            continue
        search, ascii_only = compiled
        assert ascii_only == (pattern.startswith("(?i)") or perl), pattern
        try:
            program.execute({"s": "", "p": pattern})
        except Exception:
            continue  # the interpreter refuses it: compile_native leaves it to its error
        compiled_count += 1
        for _ in range(8):
            s = "".join(rng.choice(HAYSTACK) for _ in range(rng.randint(0, 7)))
            expected = program.execute({"s": s, "p": pattern})
            try:
                got = (matches_ascii if ascii_only else matches)(s, search)
            except Fallback:
                assert ascii_only and not s.isascii(), (pattern, s)
                deferred += 1
                continue
            assert got == expected, f"{pattern!r} on {s!r}: fast {got}, interpreter {expected}"
            checks += 1
            hits += got
    assert compiled_count > 900 and checks > 5000 and deferred > 500, (compiled_count, deferred)
    assert 0.1 < hits / checks < 0.9, hits


def test_matches_takes_linear_time_on_hostile_arguments() -> None:
    """Patterns a backtracking engine takes quadratic or exponential time on, against the
    arguments that trigger it: answered at once, as by the interpreter's engine. (Python's re
    took 0.14 s for `x.*y` over 20,000 `x`, growing with the square of the length.)"""
    import time

    for source, query in [
        ("args.query.matches('x.*y')", "x" * 200_000),
        ("args.query.matches('(a+)+$')", "a" * 5_000 + "!"),
        ("args.query.matches('(a|aa)*b')", "a" * 5_000),
    ]:
        native = compile_native(source)
        assert native is not None, source
        started = time.process_time()
        assert native({"args": {"query": query}}) is False
        assert time.process_time() - started < 0.1, source  # linear: about a millisecond


@pytest.mark.parametrize(
    ("source", "query", "expected"),
    [
        ("args.query.matches('^\\\\$\\\\(')", "$(rm -rf /)", True),
        ("args.query.matches('^\\\\$\\\\(')", "echo $(x)", False),
        ("args.query.matches('abc$')", "abc\n", False),  # RE2's $: the end, not before "\n"
        ("args.query.matches('[a-z]+@[a-z]+\\\\.com')", "mail bob@example.com now", True),
        ("!args.query.matches('(ssn|passport)[ _-]?[0-9]{3}')", "ssn 123", False),
        ("args.query.matches('\\\\d{3}-\\\\d{2}-\\\\d{4}')", "ssn 123-45-6789", True),
        ("args.query.matches('(?i)^drop\\\\s+table\\\\b')", "DROP \t TABLE users", True),
        ("args.query.matches('(?i)^drop\\\\s+table\\\\b')", "DROP TABLEs", False),
    ],
)
def test_matches_compiles_once_and_answers(source: str, query: str, expected: bool) -> None:
    native = compile_native(source)
    assert native is not None
    env = {"args": {"query": query}}
    assert native(env) is expected
    assert interpret(source, env) is expected
    with pytest.raises(Fallback):  # not a string: the interpreter words the error
        native({"args": {"query": 7}})


def test_a_perl_class_leaves_text_beyond_ascii_to_the_interpreter() -> None:
    """`\\d` is ASCII in RE2 and Unicode in the interpreter: Arabic-Indic digits are the
    interpreter's to answer (it says they match)."""
    source = "args.query.matches('\\\\d{3}')"
    native = compile_native(source)
    assert native is not None
    assert native({"args": {"query": "no 123"}}) is True
    env = {"args": {"query": "\u0663\u0663\u0663"}}
    with pytest.raises(Fallback):
        native(env)
    assert interpret(source, env) is True


def test_every_escaped_punctuation_means_what_the_interpreter_means() -> None:
    """Each escaped ASCII punctuation character, alone and in a class, against strings that
    hold it or not: where the fast path compiles it, it answers as the interpreter does (Rust
    reads `\\<` and `\\>` as word boundaries, RE2 as literals: those stay interpreted)."""
    import string

    from proxy.cel.regex import compile_pattern
    from proxy.cel.runtime import matches

    program = cel.compile("s.matches(p)")
    compiled = 0
    for char in string.punctuation:
        for pattern in ("\\" + char, "[\\" + char + "]", "a\\" + char + "b"):
            found = compile_pattern(pattern)
            if found is None:
                continue
            compiled += 1
            for s in ("", "a", char, "a" + char + "b", "<a>", "x y"):
                expected = program.execute({"s": s, "p": pattern})
                assert matches(s, found[0]) == expected, (pattern, s)
    assert compiled > 80


# --- matches with a literal pattern: str's own tests (proxy.cel.regex.literal) -------------------

LITERAL_PIECES = ["a", "b", "é", " ", "\n", "\\.", "\\$", "\\(", "\\\\", "\\-", "$", "K"]


def test_a_literal_pattern_is_a_string_test_that_agrees_with_the_interpreter() -> None:
    """Patterns of literals (escaped punctuation included), anchored or not, against strings
    built from the same characters: the fast path, which answers them with startswith,
    endswith, `in` or `==` rather than RE2, agrees with the interpreter on every one."""
    from proxy.cel.regex import literal

    rng = random.Random(SEED)
    chosen = {True: 0, False: 0}
    checks = hits = 0
    for _ in range(600):
        body = "".join(rng.choice(LITERAL_PIECES[:-2]) for _ in range(rng.randint(0, 3)))
        pattern = rng.choice(["", "^"]) + body + rng.choice(["", "$"])
        found = literal(pattern)
        assert found is not None, pattern
        chosen[found[1]] += 1
        source = f"s.matches({pattern!r})"
        native = compile_native(source)
        assert native is not None and "matches(" not in _generated(source), pattern
        for _ in range(6):
            s = "".join(rng.choice("ab é\n.$(\\-K") for _ in range(rng.randint(0, 5)))
            if rng.random() < 0.4:  # make a match likely: the text itself, maybe wrapped
                s = rng.choice(["", "a", "\n"]) + found[0] + rng.choice(["", "b", "\n"])
            expected = interpret(source, {"s": s})
            assert native({"s": s}) is expected, f"{pattern!r} on {s!r}: {expected}"
            checks += 1
            hits += expected
    assert checks == 3600 and 0.2 < hits / checks < 0.8 and min(chosen.values()) > 200


@pytest.mark.parametrize(
    "pattern", ["a.b", "(?i)ab", "a*", "[a]", "a|b", "\\d", "\\<", "a$b", "^^a", "a\\"]
)
def test_a_pattern_with_any_operator_is_not_a_literal(pattern: str) -> None:
    from proxy.cel.regex import literal

    assert literal(pattern) is None


def _generated(source: str) -> str:
    """The Python source compile_native builds for `source`."""
    from proxy.cel.parser import Parser, tokenize

    generator = codegen._Generator()
    return generator.gen(Parser(tokenize(source)).parse(), {})
