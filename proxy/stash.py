"""Stashed blocked calls: what the model produced but the client never saw.

When some calls of a response are allowed and some blocked, the client sees only the allowed
ones. The model's conversation must still be complete, so the blocked calls and their error
results are stashed under the ids the client *did* see, and re-inserted when the client sends
its next turn.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog

from proxy.store import Store, key_part

log = structlog.get_logger("callgate.stash")


# Key layout. Clients choose principals, call ids, response and conversation ids, so every such
# part is escaped (key_part) for the ":" that could end it: no choice of them reaches another
# key. Principals keep their ":" (API-key fingerprints have one); the call id after them cannot.


def chat_key(principal: str, call_id: str) -> str:
    # Scoped by principal: replaying someone else's call id must not pull in their calls.
    return f"stash:chat:{principal}:{key_part(call_id, ':')}"


def responses_key(response_id: str) -> str:
    """A response's entry: its id has no ":", unlike the two kinds of key below."""
    return f"stash:responses:{key_part(response_id, ':')}"


def responses_call_key(principal: str, call_id: str) -> str:
    return f"stash:responses:call:{principal}:{key_part(call_id, ':')}"


def responses_conversation_key(conversation: str) -> str:
    return f"stash:responses:conversation:{key_part(conversation, ':')}"


async def put(store: Store, keys: list[str], value: dict[str, Any], ttl: float) -> None:
    data = orjson.dumps(value)
    try:
        for key in keys:
            await store.put_stash(key, data, ttl)
    except Exception as exc:
        # The response still goes out; the next turn may then lack the blocked call's result.
        log.error("stash_write_failed", error=str(exc), keys=len(keys))


async def get_many(store: Store, keys: list[str]) -> list[dict[str, Any] | None]:
    if not keys:
        return []
    try:
        raw = await store.get_stash_many(keys)
    except Exception as exc:
        log.error("stash_read_failed", error=str(exc), keys=len(keys))
        return [None] * len(keys)
    out: list[dict[str, Any] | None] = []
    for key, value in zip(keys, raw, strict=True):
        try:
            entry = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError:
            entry = None
        if value is not None and not isinstance(entry, dict):
            log.error("stash_entry_corrupt", key=key)
            entry = None
        out.append(entry)
    return out
