"""Who is acting: the first configured source that names a principal, else "global".

API keys are never used as names: the `api_key` source yields a short SHA-256 fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

GLOBAL = "global"


def api_key_of(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("api-key") or None


def fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


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
        if isinstance(value, str) and value.strip():
            return value.strip()[:200]
    return GLOBAL
