"""The operations compiled CEL calls: each answers only for operands whose CEL meaning it knows
and raises Fallback otherwise, so that the interpreter gives the real answer or error."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
EXACT_FLOAT_INT = 2**53  # ints this small compare with doubles the same way in both engines

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


class Fallback(Exception):
    """The compiled form cannot vouch for this evaluation: ask the interpreter."""


# --- runtime helpers: each answers only for operands it understands ------------------------------


def fallback() -> Any:
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
        return bool(-EXACT_FLOAT_INT <= a <= EXACT_FLOAT_INT)
    if ta is float and tb is int:
        return bool(-EXACT_FLOAT_INT <= b <= EXACT_FLOAT_INT)
    return False


def eq(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    if ta is tb and (ta is str or ta is bool or ta is float or a is None):
        return bool(a == b)
    if _num_pair(a, b):
        return bool(a == b)
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
    return _num_pair(a, b) and bool(a == a and b == b)


def lt(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return bool(a < b)
    raise Fallback


def le(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return bool(a <= b)
    raise Fallback


def gt(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return bool(a > b)
    raise Fallback


def ge(a: Any, b: Any) -> bool:
    if _ordered(a, b):
        return bool(a >= b)
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


def matches(a: Any, search: Callable[[str], Any]) -> bool:
    """`a.matches(PATTERN)` with the pattern compiled once (proxy.cel.regex): its `search`."""
    if type(a) is str:
        try:
            return search(a) is not None
        except Exception:  # a string RE2 cannot take (a lone surrogate): the interpreter's
            raise Fallback from None
    raise Fallback


def matches_exactly(a: Any, b: Any) -> bool:
    """`a.matches("^TEXT$")` for a pattern of literals only (proxy.cel.regex.literal)."""
    if _str_pair(a, b):
        return bool(a == b)
    raise Fallback


def matches_ascii(a: Any, search: Callable[[str], Any]) -> bool:
    """`matches` with a pattern that means the same in both engines over ASCII text only."""
    if type(a) is str and a.isascii():
        return search(a) is not None
    raise Fallback


def starts_with(a: Any, b: Any) -> bool:
    if _str_pair(a, b):
        return bool(a.startswith(b))
    raise Fallback


def ends_with(a: Any, b: Any) -> bool:
    if _str_pair(a, b):
        return bool(a.endswith(b))
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
