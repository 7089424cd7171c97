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

parser.py reads the source into a tree, codegen.py writes the tree as Python calling the
operations in runtime.py; regex.py compiles a constant `matches` pattern once, with RE2
(linear time, as the interpreter's engine), when it keeps to the syntax both read alike.
(The interpreter is the third-party package `cel`, imported as such.)
"""

from proxy.cel.codegen import compile_native, engine_agrees, not_compiled_because
from proxy.cel.runtime import Fallback, ascii_lower, ascii_upper

__all__ = [
    "Fallback",
    "ascii_lower",
    "ascii_upper",
    "compile_native",
    "engine_agrees",
    "not_compiled_because",
]
