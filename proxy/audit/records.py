"""The forms a record takes in the audit file: redaction of secret keys, and the bounded, safe
forms of a record that cannot be written whole (arguments too long, or not serializable).

Every record is serialized on its own: one that cannot be (nesting deeper than orjson's 254
levels, an int beyond 64 bits, a lone surrogate) is written in a bounded, safe form, as are
arguments longer than `max_argument_bytes`; no record can affect another's line.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

from proxy.audit.chain import GENESIS
from proxy.timestamps import utc_iso

REDACTED = "[REDACTED]"
PREVIEW_CHARS = 1024  # of arguments recorded as a digest
MAX_FIELD_CHARS = 4096  # a longer string field (a tool name, a call id) is cut in the file
TORN_SCAN_BYTES = 64 * 1024 * 1024  # how far back start-up looks for the last whole record
_CONTAINERS = (dict, list)  # what redact() descends into
_SCALARS = frozenset((str, int, float, bool, type(None)))  # what it never needs to look into


def redact(value: Any, keys: frozenset[str]) -> Any:
    """`value` with the value of every dict key in `keys` replaced, at any depth.

    When no key matches (the usual case) `value` itself is returned, after a walk that only
    descends into nested dicts and lists. Both walks use a stack of their own, not Python's:
    any depth works (arguments come from a JSON parser, so they hold no cycles).
    """
    if not keys:
        return value
    # The usual arguments, a flat object none of whose keys match, without the walk: type()
    # of each value, in C. Only known scalars qualify (a dict subclass must be walked).
    if (
        type(value) is dict
        and keys.isdisjoint(value)
        and _SCALARS.issuperset(map(type, value.values()))
    ):
        return value
    if not _mentions(value, keys):
        return value
    return _redacted(value, keys)


def _mentions(value: Any, keys: frozenset[str]) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not keys.isdisjoint(item):
                return True
            stack.extend(v for v in item.values() if isinstance(v, _CONTAINERS))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, _CONTAINERS))
    return False


def _redacted(value: Any, keys: frozenset[str]) -> Any:
    if not isinstance(value, _CONTAINERS):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]  # (original, its copy being filled)
    while stack:
        src, dst = stack.pop()
        if isinstance(src, dict):
            for k, v in src.items():
                if k in keys:
                    dst[k] = REDACTED
                elif isinstance(v, _CONTAINERS):
                    child: Any = {} if isinstance(v, dict) else []
                    dst[k] = child
                    stack.append((v, child))
                else:
                    dst[k] = v
        else:
            for v in src:
                if isinstance(v, _CONTAINERS):
                    child = {} if isinstance(v, dict) else []
                    dst.append(child)
                    stack.append((v, child))
                else:
                    dst.append(v)
    return root


class _Raw(str):
    """A piece of JSON text to emit as is (in `_preview`'s work stack, among values)."""


def _json_string(text: str) -> str:
    try:
        return orjson.dumps(text).decode()
    except TypeError:  # a lone surrogate: the standard library escapes it as \\udxxx
        return json.dumps(text)


def _preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """The start (up to `limit` characters) of a JSON-like text of any value: any depth, any
    int, any string; other types as their repr. Stops as soon as it has `limit` characters,
    so its cost is bounded whatever the value's size."""
    out: list[str] = []
    size = 0
    stack: list[Any] = [value]
    seen: set[int] = set()
    while stack and size < limit:
        item = stack.pop()
        if type(item) is _Raw:
            text: str = item
        elif isinstance(item, dict | list):
            text = _open_container(item, stack, seen)
        else:
            text = _scalar_text(item, limit)
        out.append(text)
        size += len(text)
    return "".join(out)[:limit]


def _open_container(item: dict[Any, Any] | list[Any], stack: list[Any], seen: set[int]) -> str:
    """`_preview`'s step into a dict or list: its opening bracket; its members (between
    separators) and closing bracket pushed to come next."""
    if id(item) in seen:  # not from a JSON parser, but never loop
        return '"<cycle>"'
    seen.add(id(item))
    if isinstance(item, dict):
        stack.append(_Raw("}"))
        entries = list(item.items())
        for i in range(len(entries) - 1, -1, -1):
            key, child = entries[i]
            stack.append(child)
            name = key if isinstance(key, str) else str(key)
            stack.append(_Raw(("," if i else "") + _json_string(name) + ":"))
        return "{"
    stack.append(_Raw("]"))
    for i in range(len(item) - 1, -1, -1):
        stack.append(item[i])
        if i:
            stack.append(_Raw(","))
    return "["


def _scalar_text(item: Any, limit: int) -> str:
    if isinstance(item, str):
        return _json_string(item[:limit])
    if item is None or isinstance(item, bool):
        return "null" if item is None else ("true" if item else "false")
    if isinstance(item, int):
        try:
            return str(item)
        except ValueError:  # more digits than Python will print
            return f'"<int of {item.bit_length()} bits>"'
    if isinstance(item, float):
        return json.dumps(item)  # NaN and Infinity spelled out
    try:
        return _json_string(repr(item)[:limit])
    except Exception:  # a broken __repr__
        return f'"<{type(item).__name__}>"'


def _digest_form(marker: str, detail: Any, raw: str | None, preview: str) -> dict[str, Any]:
    """What the file holds in place of arguments that cannot be written (or not whole): the
    size and sha256 of the arguments as the model sent them, and the start of their text. No
    digest when a redacted key was involved: a digest of a short secret could be guessed."""
    form: dict[str, Any] = {marker: detail}
    if raw is None:
        form["redacted"] = True
    else:
        data = raw.encode("utf-8", "surrogatepass")
        form["bytes"] = len(data)
        form["sha256"] = hashlib.sha256(data).hexdigest()
    form["preview"] = preview
    return form


def _cut(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[:MAX_FIELD_CHARS]}...[{len(text)} chars, sha256 {digest}]"


def _bounded_body(record: dict[str, Any], raw: str | None, limit: int) -> bytes:
    """The line body of a record that serialized but came out larger than `limit`: arguments
    over `limit` become their digest form, other long strings are cut."""
    new: dict[str, Any] = {}
    for key, value in record.items():
        if key == "arguments":
            text = orjson.dumps(value)
            if len(text) > limit:
                preview = text[:PREVIEW_CHARS].decode("utf-8", "ignore")
                value = _digest_form("truncated", f"over {limit} bytes", raw, preview)
        elif key != "prev" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            value = _cut(value)
        new[key] = value
    return orjson.dumps(new)


def _safe_body(record: dict[str, Any], raw: str | None, limit: int) -> bytes:
    """The line body of a record orjson cannot serialize: each field that cannot be is
    replaced (arguments by their digest form, other fields by an escaped text of them and
    listed in `unserializable`); what can be is kept, bounded as usual."""
    new: dict[str, Any] = {}
    bad: list[str] = []
    prev = record.get("prev", GENESIS)
    for key, value in record.items():
        if key == "prev":
            continue
        try:
            text = orjson.dumps(value)
        except TypeError as exc:  # orjson.JSONEncodeError
            if key == "arguments":
                value = _digest_form("unserializable", str(exc), raw, _preview(value))
            else:
                bad.append(key)
                if isinstance(value, str):
                    value = value.encode("utf-8", "backslashreplace").decode()
                else:
                    value = _preview(value, MAX_FIELD_CHARS)
        else:
            if key == "arguments" and len(text) > limit:
                preview = text[:PREVIEW_CHARS].decode("utf-8", "ignore")
                value = _digest_form("truncated", f"over {limit} bytes", raw, preview)
        if key != "arguments" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            value = _cut(value)
        new[key] = value
    if bad:
        new["unserializable"] = bad
    new["prev"] = prev
    try:
        return orjson.dumps(new)
    except TypeError as exc:  # cannot happen by construction; still, never lose the line
        last: dict[str, Any] = {"time": utc_iso(), "unserializable": str(exc), "prev": prev}
        return orjson.dumps(last)
