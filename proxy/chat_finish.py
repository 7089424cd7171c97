"""The end of a Chat Completions stream round, as data: what a settled choice leaves for the
client (its finish reason, the stash entry for the calls it lost) and the body of a reprompt.

Pure functions of what proxy.chat_gate held, so the gate's own methods stay the event handling;
each runs once per settled choice or round, never per event.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy import chat, reprompt, sse, stash
from proxy.chat_held import ChoiceState, HeldCall
from proxy.policy import Policy
from proxy.rounds import Plan
from proxy.stream_effects import Stash
from proxy.toolcalls import CallContext


def chunk(template: dict[str, Any], choice: dict[str, Any], keep_usage: bool = False) -> bytes:
    """One choice's chunk, encoded, on the envelope of `template` (a chunk of the round)."""
    obj = {k: v for k, v in template.items() if k != "choices"}
    if "usage" in obj and not keep_usage:
        obj["usage"] = None  # split-off chunks must not repeat the usage
    obj["choices"] = [choice]
    return sse.encode(obj)


def stash_order(policy: Policy, ctx: CallContext, st: ChoiceState, p: Plan) -> Stash | None:
    """The blocked calls a choice lost, stashed under its surviving calls (None: nothing to
    stash, as no call survived or none was removed)."""
    blocked = {d.call.id for d in p.blocked}
    kept = [c.id for c, d in zip(st.calls, st.decisions, strict=True) if d.allowed and not c.legacy]
    stashed = [c for c in st.calls if c.id in blocked and not c.legacy]
    if not kept or not stashed:
        return None
    by_id = {d.call.id: d for d in p.blocked}
    return Stash(
        [stash.chat_key(ctx.principal, i) for i in kept],
        {
            "calls": [chat.wire_call(c.wire()) for c in stashed],
            "results": [chat.tool_result_messages([by_id[c.id]])[0] for c in stashed],
        },
        policy.config.server.stash_ttl,
    )


def finish_reason(st: ChoiceState, p: Plan, finish: str) -> str:
    """A settled choice's finish reason: `stop` once none of its calls survived."""
    if not p.allowed:
        return "stop"
    return "function_call" if any(c.legacy for c in st.calls) else finish


def error_passed(text: list[bytes | str]) -> Any:
    """The upstream's error, when the last event passed on raw was its error event (one with
    no call in play goes to the client as text, unparsed); else None."""
    if not text or not isinstance(text[-1], bytes):
        return None
    last = text[-1].rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    payload = sse.data_of(last)
    if not payload or payload == sse.DONE:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
        return obj["error"]
    return None


def round_content(text: list[bytes | str]) -> str | None:
    """A round's text: the extracted strings, and the content of the raw events passed on."""
    parts: list[str] = []
    for item in text:
        if isinstance(item, str):
            parts.append(item)
            continue
        for event in sse.EventSplitter().feed(item if item.endswith(b"\n\n") else item + b"\n\n"):
            payload = sse.data_of(event)
            if not payload or payload == sse.DONE:
                continue
            try:
                obj = orjson.loads(payload)
                for c in obj.get("choices") or []:
                    content = (c.get("delta") or {}).get("content")
                    if isinstance(content, str):
                        parts.append(content)
            except (orjson.JSONDecodeError, AttributeError):
                continue
    return "".join(parts) or None


def reprompt_body(
    policy: Policy, body: dict[str, Any], calls: list[HeldCall], content: str | None, p: Plan
) -> dict[str, Any]:
    """The next round's body: the round's turn with its calls, each blocked call's result."""
    legacy = next((c for c in calls if c.legacy), None)
    turn = chat.assistant_turn(
        content,
        [c.wire() for c in calls if not c.legacy],
        {"name": legacy.name, "arguments": legacy.arguments} if legacy else None,
    )
    messages = [*(body.get("messages") or []), turn, *chat.tool_result_messages(p.blocked)]
    blocked = {d.call.name for d in p.blocked}
    relaxed = chat.relaxed_tool_choice(body, blocked, reprompt.denied(policy))
    return {**body, "messages": messages, **relaxed}
