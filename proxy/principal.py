"""Who is acting: the first configured source that names a principal, else "global".

API keys are never used as names: the `api_key` source yields a short SHA-256 fingerprint.

A principal scopes rate limits, budgets and stashes, and is written in every audit record and
log line, so two different values must never become one principal, and none may carry what a
log or a key must not (control characters, line breaks, bidi overrides, lone surrogates).
`canonical` keeps a short printable value as it is and replaces any other by a printable
prefix and a digest of the whole value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

GLOBAL = "global"

MAX_PRINCIPAL = 200  # characters of a canonical principal, at most
DIGEST_HEX = 32  # 128 bits of SHA-256: no second value can be found for someone's principal
_MARK = "~"
_HINT = MAX_PRINCIPAL - len(_MARK) - DIGEST_HEX
_HEX = frozenset("0123456789abcdef")


def api_key_of(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("api-key") or None


def fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _digested(value: str) -> bool:
    """Whether `value` has the shape `canonical` gives a digested value: `...~<32 hex>`."""
    return value[-DIGEST_HEX - 1 : -DIGEST_HEX] == _MARK and _HEX.issuperset(value[-DIGEST_HEX:])


def canonical(value: str) -> str:
    """The principal a (stripped, non-empty) source value names: one-to-one, printable, bounded.

    A value of at most MAX_PRINCIPAL printable characters is kept as it is. Any other (longer,
    or with a character str.isprintable() refuses: controls, line and paragraph separators,
    format characters such as U+202E, surrogates) becomes its first characters, each
    unprintable one shown as "?", then "~" and a digest of the whole value. A value that already
    ends like a digest is digested too, so a kept value never equals a digested one: distinct
    values stay distinct up to a 128-bit hash collision.
    """
    if len(value) <= MAX_PRINCIPAL and value.isprintable() and not _digested(value):
        return value
    # surrogatepass: a header's undecodable bytes arrive as lone surrogates; still one-to-one.
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_HEX]
    hint = "".join(c if c.isprintable() else "?" for c in value[:_HINT])
    return f"{hint}{_MARK}{digest}"


def resolve_principal(sources: list[str], headers: Mapping[str, str], body: dict[str, Any]) -> str:
    for source in sources:
        kind, _, name = source.partition(":")
        value: Any = None
        if kind == "header":
            value = headers.get(name)
        elif kind == "body":
            value = body.get(name)
        elif kind == "metadata":
            metadata = body.get("metadata")
            value = metadata.get(name) if isinstance(metadata, dict) else None
        elif kind == "api_key":
            key = api_key_of(headers)
            value = fingerprint(key) if key else None
        if isinstance(value, str):
            value = value.strip()
            if value:
                return canonical(value)
    return GLOBAL
