"""Chat Completions shapes: reading tool calls out of a message and rewriting around blocks.

Pure functions over the decoded JSON; the route (proxy.routes.chat) does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy.gates.decision import Decision
from proxy.policy import ToolPolicy
from proxy.toolcalls import ToolCall

LEGACY_ID = "function_call"  # the id we give a legacy `function_call` (it has none on the wire)


def _text(value: Any) -> str:
    """Arguments as the JSON text the model meant (some servers send an object, not a string)."""
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()


def calls_of(message: dict[str, Any]) -> list[ToolCall]:
    """The calls of a message, each with its position in `tool_calls` (ids can repeat)."""
    calls = []
    raw_calls = message.get("tool_calls")
    for position, raw in enumerate(raw_calls if isinstance(raw_calls, list) else []):
        if not isinstance(raw, dict):
            continue
        call_id = str(raw.get("id") or "")
        if raw.get("type") == "custom" or "custom" in raw:
            custom = raw.get("custom")
            if not isinstance(custom, dict):
                custom = {}
            name, text, kind = custom.get("name"), custom.get("input"), "custom"
        else:
            fn = raw.get("function")
            if not isinstance(fn, dict):
                fn = {}
            name, text, kind = fn.get("name"), fn.get("arguments"), "function"
        calls.append(ToolCall(call_id, str(name or ""), _text(text), kind, position))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        mirror = ToolCall(LEGACY_ID, str(legacy.get("name") or ""), _text(legacy.get("arguments")))
        # llama.cpp-style servers repeat a call as legacy `function_call` next to `tool_calls`:
        # a mirror of one of the calls shares its fate (it goes when a call is removed), but one
        # that names anything else is a call a legacy client would run, so it is decided too.
        if not any(c.name == mirror.name and c.arguments == mirror.arguments for c in calls):
            calls.append(mirror)
    return calls


def _object_text(value: Any) -> str:
    """Arguments as the text of a JSON object: what every server's request schema takes.

    vLLM and llama.cpp's server parse an assistant turn's arguments as JSON and Ollama as an
    object; arguments that are none of that (a call blocked as `invalid_arguments`, an empty
    string for a call without parameters) would fail the whole request, so they go as `{}`.
    The error result next to the call tells the model what was wrong with them.
    """
    text = _text(value)
    if text.startswith("{"):
        try:
            if isinstance(orjson.loads(text), dict):
                return text
        except orjson.JSONDecodeError:
            pass
    return "{}"


def wire_call(raw: dict[str, Any]) -> dict[str, Any]:
    """A `tool_calls` entry as callgate sends it upstream (reprompts, stashed calls): null
    members left out, function arguments as JSON object text. Other members (ids, a
    provider's extras such as thought signatures) are kept as they came."""
    call = {k: v for k, v in raw.items() if v is not None}
    fn = call.get("function")
    if isinstance(fn, dict):
        fn = {k: v for k, v in fn.items() if v is not None}
        fn["arguments"] = _object_text(fn.get("arguments"))
        call["function"] = fn
    return call


def content_text(content: Any) -> str:
    """An assistant turn's `content` as a string: llama-cpp-python refuses null (and an
    omitted `content`), Ollama refuses null without tool calls; `""` is valid everywhere."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return "".join(
            str(p.get("text") or "")
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "output_text")
        )
    return ""


def assistant_turn(content: Any, tool_calls: Any, legacy: Any = None) -> dict[str, Any]:
    """The model's turn as callgate writes it upstream on a reprompt round, in the form every
    OpenAI-compatible server accepts (README, "Upstream compatibility"): `content` a string,
    no null members, and the legacy `function_call` only when there are no `tool_calls`
    (llama.cpp-style servers mirror one beside them; sending both is not OpenAI's shape)."""
    turn: dict[str, Any] = {"role": "assistant", "content": content_text(content)}
    calls = [wire_call(c) for c in tool_calls if isinstance(c, dict)] if tool_calls else []
    if calls:
        turn["tool_calls"] = calls
    elif isinstance(legacy, dict):
        turn["function_call"] = {
            "name": str(legacy.get("name") or ""),
            "arguments": _object_text(legacy.get("arguments")),
        }
    return turn


def error_content(decision: Decision) -> str:
    return orjson.dumps(decision.error_result()).decode()


def notice(blocked: list[Decision]) -> str:
    parts = [f"{d.call.name} ({d.block.message})" for d in blocked if d.block]
    return (
        "[callgate] blocked tool call" + ("s" if len(parts) > 1 else "") + ": " + "; ".join(parts)
    )


def tool_result_messages(blocked: list[Decision]) -> list[dict[str, Any]]:
    """What the model is told in place of each blocked call's output."""
    out = []
    for d in blocked:
        if d.call.id == LEGACY_ID:
            out.append({"role": "function", "name": d.call.name, "content": error_content(d)})
        else:
            out.append({"role": "tool", "tool_call_id": d.call.id, "content": error_content(d)})
    return out


def strip_calls(
    choice: dict[str, Any], blocked: list[Decision], *, with_notice: bool
) -> list[tuple[dict[str, Any], Decision]]:
    """Remove blocked calls from a choice in place; return each removed `tool_calls` entry with
    its decision (the legacy `function_call` is removed but not returned: it has no id)."""
    message = choice.get("message") or {}
    by_position = {d.call.position: d for d in blocked if d.call.id != LEGACY_ID}
    removed: list[tuple[dict[str, Any], Decision]] = []
    if any(d.call.id == LEGACY_ID for d in blocked):
        message.pop("function_call", None)
    kept = []
    raw_calls = message.get("tool_calls")
    for position, raw in enumerate(raw_calls if isinstance(raw_calls, list) else []):
        if position in by_position:
            removed.append((raw, by_position[position]))
        else:
            kept.append(raw)
    if "tool_calls" in message:
        if kept:
            message["tool_calls"] = kept
        else:
            del message["tool_calls"]
        if removed:
            # The legacy mirror some servers add names the first call: it may be a removed one.
            message.pop("function_call", None)
    if with_notice and blocked:
        text = notice(blocked)
        content = message.get("content")
        message["content"] = f"{content}\n\n{text}" if content else text
    if (
        not kept
        and "function_call" not in message
        and choice.get("finish_reason") in ("tool_calls", "function_call")
    ):
        choice["finish_reason"] = "stop"
    return removed


def reinsert_stashed(messages: list[Any], stashes: dict[str, dict[str, Any]]) -> bool:
    """Put stashed blocked calls and their error results back into the conversation.

    `stashes` maps a visible call id to its stash. Returns True when anything changed.
    """
    changed = False
    i = 0
    while i < len(messages):
        msg = messages[i]
        i += 1
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            continue
        calls = msg.get("tool_calls")
        if not isinstance(calls, list):
            continue
        present = {c.get("id") for c in calls if isinstance(c, dict)}
        seen_stashes: set[int] = set()
        inserted: list[dict[str, Any]] = []
        for call_id in list(present):
            stash = stashes.get(call_id)  # type: ignore[arg-type]
            if stash is None or id(stash) in seen_stashes:
                continue
            seen_stashes.add(id(stash))
            for call, result in zip(stash["calls"], stash["results"], strict=True):
                if call.get("id") in present:
                    continue  # the client already carries it (idempotent re-insertion)
                calls.append(call)
                present.add(call.get("id"))
                inserted.append(result)
        if inserted:
            messages[i:i] = inserted
            i += len(inserted)
            changed = True
    return changed


def visible_call_ids(messages: list[Any]) -> list[str]:
    ids = []
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            for call in msg.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    ids.append(call["id"])
    return ids


def never_allowed(tool: ToolPolicy) -> bool:
    """An enforced `allow: false` (a shadow-mode rule only records, so it hides nothing)."""
    return not tool.allow and tool.rules_mode == "enforce"


def hide_tools(body: dict[str, Any], hidden: set[str]) -> bool:
    """Drop tools the principal may never use, so the model cannot pick them. True if changed."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not hidden:
        return False
    kept = [t for t in tools if tool_name(t) not in hidden]
    if len(kept) == len(tools):
        return False
    if kept:
        body["tools"] = kept
    else:
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            body.pop(key, None)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and tool_name(choice) in hidden:
        body["tool_choice"] = "auto"
    return True


def tool_name(tool: Any) -> str | None:
    if not isinstance(tool, dict):
        return None
    for key in ("function", "custom"):
        inner = tool.get(key)
        if isinstance(inner, dict):
            return inner.get("name")
    return tool.get("name")


def relaxed_tool_choice(
    body: dict[str, Any], blocked: set[str], denied: Callable[[str], bool]
) -> dict[str, Any]:
    """Request members to change on a reprompt round, so it does not force again what was
    just blocked (every round would be blocked until `max_reprompts` runs out).

    A `tool_choice` that forces a blocked tool by name, or `required` (also as
    `allowed_tools` mode), or a legacy `function_call` naming a blocked function, becomes
    `auto`, or `none` when no tool is left that the model may call: the tools of the request
    minus those just blocked and those the policy never allows (`denied`).
    """
    tools = body.get("tools")
    names = [n for n in map(tool_name, tools if isinstance(tools, list) else []) if n]
    left = [n for n in names if n not in blocked and not denied(n)]
    relaxed = _relaxed_choice(body.get("tool_choice"), blocked, left)
    if relaxed is not None:
        return relaxed
    legacy = body.get("function_call")
    if isinstance(legacy, dict) and legacy.get("name") in blocked:
        functions = body.get("functions")
        fns = [f.get("name") for f in functions if isinstance(f, dict)] if functions else []
        return {"function_call": "auto" if any(n not in blocked for n in fns) else "none"}
    return {}


def _relaxed_choice(choice: Any, blocked: set[str], left: list[str]) -> dict[str, Any] | None:
    """relaxed_tool_choice's `tool_choice`; None when it does not force a blocked tool."""
    if choice == "required" or (isinstance(choice, dict) and tool_name(choice) in blocked):
        return {"tool_choice": "auto" if left else "none"}
    allowed = choice.get("allowed_tools") if isinstance(choice, dict) else None
    if not isinstance(allowed, dict) or allowed.get("mode") != "required":
        return None
    listed = {tool_name(t) for t in allowed.get("tools") or []}
    if not any(n in listed for n in left):
        return {"tool_choice": "none"}
    return {"tool_choice": {**choice, "allowed_tools": {**allowed, "mode": "auto"}}}
