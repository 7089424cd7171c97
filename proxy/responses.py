"""Responses API shapes: reading tool calls out of `output`, rewriting around blocks, stashing.

Pure functions over the decoded JSON; the route (proxy.routes.responses) and the stream gate
(proxy.responses_gate) render them; proxy.stream_loop does the I/O.

Items are identified by their *key*: `call:<call_id>` for the calls the client runs (function
and custom tool calls, and the built-in client-run tools' `shell_call`, `local_shell_call`,
`apply_patch_call`) and their outputs (the call id is what outputs refer to, and clients that
build their own input often drop item ids), `id:<id>` for everything else.

What the stash keeps for a response the client saw, and how the next turn gets it back:
proxy.responses_stash.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from proxy import stash
from proxy.chat import notice
from proxy.gates.decision import Decision
from proxy.policy import Policy, ToolPolicy
from proxy.toolcalls import ToolCall

# Calls to tools the client defines: item type -> ToolCall kind. Named by their `name`.
NAMED_CALL_TYPES = {"function_call": "function", "custom_tool_call": "custom"}
# Calls to built-in tools the client runs: item type -> (policy name: the tool's type, the field
# the gates see as `args`). The ToolCall kind is the item type.
BUILTIN_CALL_TYPES = {
    "shell_call": ("shell", "action"),
    "local_shell_call": ("local_shell", "action"),
    "apply_patch_call": ("apply_patch", "operation"),
}
# Every call type gated item by item. Not `computer_call`: its output can only carry a
# screenshot, so a blocked one has no valid answer to tell the model why (README).
CALL_TYPES = {**NAMED_CALL_TYPES, **{t: t for t in BUILTIN_CALL_TYPES}}
OUTPUT_TYPES = {
    "function_call_output",
    "custom_tool_call_output",
    "shell_call_output",
    "local_shell_call_output",
    "apply_patch_call_output",
}
# Tool types the client runs itself, whose calls are gated item by item.
CLIENT_TOOL_TYPES = {"function", "custom"}
CLIENT_BUILTIN_TOOLS = {"shell", "local_shell", "apply_patch"}
# Shell environments where the upstream runs the commands itself. Any other (`local`, none, or
# one callgate does not know) counts as the client's: gated, failing closed.
_HOSTED_ENVIRONMENTS = {"container_auto", "container_reference"}
NOTICE_PREFIX = "msg_callgate_"
APPROVAL = "mcp_approval_request"
_FAMILY = re.compile(r"^(.*?)(?:_preview)?(?:_\d{4}_\d{2}_\d{2})?$")


def call_key(principal: str, call_id: str) -> str:
    """Stash key under which a surviving call finds its response's entry (full-input turns).

    Scoped by principal: replaying someone else's call id must not pull in their calls."""
    return stash.responses_call_key(principal, call_id)


def conversation_id(body: dict[str, Any]) -> str | None:
    conv = body.get("conversation")
    if isinstance(conv, dict):
        conv = conv.get("id")
    return conv if isinstance(conv, str) else None


def conversation_key(conversation: str) -> str:
    """Stash key for the error outputs a conversation's next turn must carry."""
    return stash.responses_conversation_key(conversation)


# -- reading ------------------------------------------------------------------------------


def type_of(item: Any) -> str | None:
    """An item's `type` when it is a string (anything else must never reach a set lookup)."""
    kind = item.get("type") if isinstance(item, dict) else None
    return kind if isinstance(kind, str) else None


def malformed_item(item: Any) -> str | None:
    """Why an output item cannot be gated safely, or None when it can."""
    if not isinstance(item, dict):
        return f"an output item is a JSON {type(item).__name__}, not an object"
    if "type" in item and not isinstance(item["type"], str):
        return "an output item's `type` is not a string"
    if item.get("type") in NAMED_CALL_TYPES and not isinstance(item.get("name"), str):
        return "a tool call's `name` is not a string"
    if item.get("type") in CALL_TYPES:
        for name in ("call_id", "id"):
            if item.get(name) is not None and not isinstance(item[name], str):
                return f"a tool call's `{name}` is not a string"
    return None


def malformed_output(output: Any) -> str | None:
    """Why a response's `output` cannot be gated safely (None: it can, or it is absent)."""
    if output is None:
        return None
    if not isinstance(output, list):
        return f"`output` is a JSON {type(output).__name__}, not an array"
    return next((m for m in map(malformed_item, output) if m), None)


def _hosted(environment: Any) -> bool:
    """Is a shell tool's (or call's) `environment` a container the upstream runs?"""
    return isinstance(environment, dict) and environment.get("type") in _HOSTED_ENVIRONMENTS


def runs_upstream(item: Any) -> bool:
    """A `shell_call` in a hosted container: the upstream ran it already, nothing to gate
    (like web search, it is gated on the request side)."""
    return type_of(item) == "shell_call" and _hosted(item.get("environment"))


def call_of(item: Any) -> ToolCall | None:
    """The gated call an output item stands for, or None for any other item."""
    if runs_upstream(item):
        return None
    return read_call(item)


def read_call(item: Any) -> ToolCall | None:
    """The call an item of a call type stands for, wherever it runs (None for other items).

    Built-in tools' calls: named by the tool type, their `action` / `operation` as arguments."""
    if not isinstance(item, dict):
        return None
    kind = CALL_TYPES.get(type_of(item) or "")
    if kind is None:
        return None
    call_id = str(item.get("call_id") or item.get("id") or "")
    if kind in BUILTIN_CALL_TYPES:
        name, field_name = BUILTIN_CALL_TYPES[kind]
        value = item.get(field_name)
        text = "" if value is None else orjson.dumps(value).decode()
        return ToolCall(call_id, name, text, kind)
    if kind == "custom":
        raw = item.get("input")
        text = raw if isinstance(raw, str) else ("" if raw is None else orjson.dumps(raw).decode())
    else:
        raw = item.get("arguments")
        text = raw if isinstance(raw, str) else ("" if raw is None else orjson.dumps(raw).decode())
    return ToolCall(call_id, str(item.get("name", "")), text, kind)


def calls_of(output: Any) -> list[ToolCall]:
    """The calls of an output, each with its position in it (call ids may repeat, or be empty)."""
    if not isinstance(output, list):
        return []
    calls = []
    for position, item in enumerate(output):
        call = call_of(item)
        if call is not None:
            call.position = position
            calls.append(call)
    return calls


def positions_of(output: list[Any], decisions: list[Decision]) -> set[int]:
    """Where decided calls sit in `output`: at the call's own position when the item there is
    that call, else wherever a call with its id is."""
    out: set[int] = set()
    for d in decisions:
        pos = d.call.position
        here = call_of(output[pos]) if 0 <= pos < len(output) else None
        if here is not None and here.id == d.call.id:
            out.add(pos)
        else:
            out |= {c.position for c in calls_of(output) if c.id == d.call.id}
    return out


def key_of(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    if type_of(item) in CALL_TYPES:
        call_id = item.get("call_id")
        if isinstance(call_id, str):
            return "call:" + call_id
    answered = output_key(item)
    if answered:
        return answered
    item_id = item.get("id")
    return "id:" + item_id if isinstance(item_id, str) else None


def output_key(item: Any) -> str | None:
    """The key of the call an output item answers (None for anything else)."""
    kind = type_of(item)
    if kind not in OUTPUT_TYPES:
        return None
    call_id = item.get("call_id")
    if call_id is None and kind == "local_shell_call_output":
        # The SDK's input type names the call's id `id` (OpenAI's guide says `call_id`).
        call_id = item.get("id")
    return "call:" + call_id if isinstance(call_id, str) else None


def as_input_list(value: Any) -> list[Any]:
    """The request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return []


# -- what the model is told ---------------------------------------------------------------


def error_output(decision: Decision) -> dict[str, Any]:
    """The output item that answers a blocked call, in its call type's own output shape: the
    error JSON in place of the tool's output (a shell's stderr, a failed patch's log)."""
    error = orjson.dumps(decision.error_result()).decode()
    call_id = decision.call.id
    kind = decision.call.kind
    if kind == "shell_call":
        outcome = {"type": "exit", "exit_code": 1}
        chunk = {"stdout": "", "stderr": error, "outcome": outcome}
        return {"type": "shell_call_output", "call_id": call_id, "output": [chunk]}
    if kind == "local_shell_call":
        return {"type": "local_shell_call_output", "call_id": call_id, "output": error}
    if kind == "apply_patch_call":
        return {
            "type": "apply_patch_call_output",
            "call_id": call_id,
            "status": "failed",
            "output": error,
        }
    kind = "custom_tool_call_output" if kind == "custom" else "function_call_output"
    return {"type": kind, "call_id": call_id, "output": error}


def notice_text(blocked: list[Decision], after_text: bool) -> str:
    return ("\n\n" if after_text else "") + notice(blocked)


def notice_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    """An assistant message telling the user which calls were blocked (`strip` mode)."""
    return {
        "id": item_id or NOTICE_PREFIX + uuid.uuid4().hex,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _parts(item: Any) -> list[dict[str, Any]]:
    """A message item's content parts (nothing, for any other item or an odd `content`)."""
    if type_of(item) != "message" or not isinstance(item.get("content"), list):
        return []
    return [part for part in item["content"] if isinstance(part, dict)]


def has_text(output: list[Any]) -> bool:
    return any(part.get("text") for item in output for part in _parts(item))


def output_text(output: list[Any]) -> str:
    return "".join(
        str(part.get("text") or "")
        for item in output
        for part in _parts(item)
        if part.get("type") == "output_text"
    )


# -- rewriting ----------------------------------------------------------------------------


def split_output(
    output: list[Any], blocked: set[int], approvals: set[str] | None = None
) -> tuple[list[Any], list[dict[str, Any]], list[str]]:
    """Remove blocked calls (by position, see `positions_of`) and answered approval requests
    (by id), and every reasoning item whose following item goes with them.

    Returns (kept items, groups of removed items with their neighbours' keys, removed keys).
    A reasoning item must never be left without its following item: OpenAI refuses such an
    input ("... was provided without its required following item").
    """
    approvals = approvals or set()
    removed = [
        (pos in blocked and type_of(item) in CALL_TYPES)
        or (type_of(item) == APPROVAL and str(item.get("id")) in approvals)
        for pos, item in enumerate(output)
    ]
    for i in range(len(output) - 2, -1, -1):
        item = output[i]
        if removed[i + 1] and type_of(item) == "reasoning":
            removed[i] = True
    kept: list[Any] = []
    groups: list[dict[str, Any]] = []
    keys: list[str] = []
    run: list[Any] = []
    for item, gone in zip(output, removed, strict=True):
        if gone:
            run.append(item)
            key = key_of(item)
            if key:
                keys.append(key)
            continue
        if run:
            groups.append({"items": run, "after": key_of(kept[-1]) if kept else None})
            run = []
        if groups and "before" not in groups[-1]:
            groups[-1]["before"] = key_of(item)
        kept.append(item)
    if run:
        groups.append({"items": run, "after": key_of(kept[-1]) if kept else None})
    for g in groups:
        g.setdefault("before", None)
    return kept, groups, keys


def visible(items: list[Any], hide: set[str]) -> list[Any]:
    """Items minus those the client must not see (by call or item key)."""
    if not hide:
        return items
    out = []
    for item in items:
        key = key_of(item)
        if key is not None and key in hide:
            continue
        if (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and "id:" + item["id"] in hide
        ):
            continue
        out.append(item)
    return out


def replayable(output: list[Any]) -> list[Any]:
    """A response's output items as input for the next request when nothing is stored upstream.

    Reasoning items without `encrypted_content` can only be referenced by id, which needs the
    stored response: they are left out.
    """
    out = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if type_of(item) == "reasoning" and not item.get("encrypted_content"):
            continue
        out.append(_without_nulls(item))
    return out


def _without_nulls(item: dict[str, Any]) -> dict[str, Any]:
    """An output item sent back as input without its null members (and its content parts'):
    OpenAI reads a null as absent, but servers that validate input items strictly (vLLM's
    and Ollama's Responses layers) refuse a null where the schema has a string."""
    out = {k: v for k, v in item.items() if v is not None}
    parts = out.get("content")
    if isinstance(parts, list):
        out["content"] = [
            {k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p
            for p in parts
        ]
    return out


# -- reprompt --------------------------------------------------------------------------------


def stored(body: dict[str, Any], data: dict[str, Any]) -> bool:
    """Did the upstream keep the response (so `previous_response_id` can refer to it)?"""
    return body.get("store") is not False and data.get("store") is not False


def next_round_body(
    body: dict[str, Any], data: dict[str, Any], outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The reprompt request: the blocked calls answered with their errors, same parameters."""
    if body.get("conversation") is not None:
        # The conversation already holds the response's items: only the outputs are new.
        return {**body, "input": outputs}
    if stored(body, data) and isinstance(data.get("id"), str):
        return {**body, "previous_response_id": data["id"], "input": outputs}
    found = data.get("output")
    output: list[Any] = found if isinstance(found, list) else []
    items = [*as_input_list(body.get("input")), *replayable(output), *outputs]
    return {**body, "input": items}


def relaxed_tool_choice(
    body: dict[str, Any], blocked: set[str], denied: Callable[[str], bool]
) -> dict[str, Any]:
    """The Responses API's `relaxed_tool_choice` (see proxy.chat): a `tool_choice` that forces
    a just-blocked tool (`{"type": "function", "name": ...}`, a custom or built-in client tool
    by type) or `required` (also as `allowed_tools` mode) becomes `auto`, or `none` when no
    tool is left that the model may call."""
    tools = body.get("tools")
    keys = [k[0] for k in map(tool_keys, tools if isinstance(tools, list) else []) if k]
    left = [k for k in keys if k not in blocked and not denied(k)]
    choice = body.get("tool_choice")
    if choice == "required":
        return {"tool_choice": "auto" if left else "none"}
    if not isinstance(choice, dict):
        return {}
    if choice.get("type") == "allowed_tools":
        if choice.get("mode") != "required":
            return {}
        listed = {k[0] for k in map(tool_keys, choice.get("tools") or []) if k}
        if not any(k in listed for k in left):
            return {"tool_choice": "none"}
        return {"tool_choice": {**choice, "mode": "auto"}}
    forced = tool_keys(choice)[:1]
    if forced and forced[0] in blocked:
        return {"tool_choice": "auto" if left else "none"}
    return {}


# -- the client's next turn (and proxy.responses_stash) --------------------------------


def strip_notice_ids(items: list[Any]) -> bool:
    """Notices callgate wrote have ids the upstream never issued: send them back without."""
    changed = False
    for item in items:
        if (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and item["id"].startswith(NOTICE_PREFIX)
        ):
            del item["id"]
            changed = True
    return changed


def input_call_ids(items: list[Any]) -> list[str]:
    ids = []
    for item in items:
        if type_of(item) in CALL_TYPES:
            call_id = item.get("call_id")
            if isinstance(call_id, str):
                ids.append(call_id)
    return ids


# -- request tools ------------------------------------------------------------------------


def client_run(tool: Any) -> bool:
    """Is this a tool whose calls the client runs, gated call by call? (function, custom, and
    the built-in shell, local_shell and apply_patch; a shell in a hosted container is not.)"""
    if not isinstance(tool, dict):
        return False
    kind = type_of(tool) or "function"
    if kind in CLIENT_TOOL_TYPES:
        return True
    if kind == "shell":
        return not _hosted(tool.get("environment"))
    return kind in CLIENT_BUILTIN_TOOLS


def has_client_tools(body: dict[str, Any]) -> bool:
    """Does the request offer tools whose calls the client runs (see `client_run`)?"""
    tools = body.get("tools")
    return isinstance(tools, list) and any(client_run(t) for t in tools)


def tool_keys(tool: Any) -> list[str]:
    """Policy names a tool definition answers to, most specific first.

    Function and custom tools: their name. Server-side and other built-in tools: their type,
    then its family (`web_search_preview_2025_03_11` -> `web_search`); MCP servers:
    `mcp:<server_label>`, then `mcp`.
    """
    if not isinstance(tool, dict):
        return []
    kind = tool.get("type")
    if kind is not None and not isinstance(kind, str):
        return []
    if kind is None or kind in CLIENT_TOOL_TYPES:
        name = tool.get("name")
        if name is None and isinstance(tool.get("function"), dict):
            name = tool["function"].get("name")
        return [name] if isinstance(name, str) else []
    if kind == "mcp":
        label = tool.get("server_label")
        return ([f"mcp:{label}"] if isinstance(label, str) else []) + ["mcp"]
    m = _FAMILY.match(kind)
    family = m.group(1) if m else kind
    return [kind] if family == kind else [kind, family]


def remove_tools(body: dict[str, Any], removed: list[Any]) -> None:
    """Take tool definitions out of a request, and every `tool_choice` that names them."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not removed:
        return
    gone = {id(t) for t in removed}
    kept = [t for t in tools if id(t) not in gone]
    gone_keys = {k for t in removed for k in tool_keys(t)[:1]}
    if kept:
        body["tools"] = kept
    else:
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            body.pop(key, None)
        return
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return
    if choice.get("type") == "allowed_tools" and isinstance(choice.get("tools"), list):
        allowed = [t for t in choice["tools"] if not (set(tool_keys(t)[:1]) & gone_keys)]
        if allowed:
            choice["tools"] = allowed
        else:
            body["tool_choice"] = "auto"
        return
    if set(tool_keys(choice)[:1]) & gone_keys:
        body["tool_choice"] = "auto"


# -- usage --------------------------------------------------------------------------------


# -- MCP approvals ------------------------------------------------------------------------


def _gated(tool: ToolPolicy) -> bool:
    return bool(tool.rules or tool.schema or tool.rate_limit or tool.budget or tool.approval)


def mcp_policy_key(policy: Policy, label: str, name: str | None = None) -> str | None:
    """The policy entry for a call to an MCP server's tool: `mcp:<label>/<tool>`, `mcp:<label>`,
    then `mcp`; None when none is configured."""
    keys = ([f"mcp:{label}/{name}"] if name else []) + [f"mcp:{label}", "mcp"]
    return next((k for k in keys if k in policy.tools), None)


def gated_mcp_servers(policy: Policy, body: dict[str, Any]) -> set[str]:
    """Force approval on the MCP servers whose calls a policy gates, in place; their labels.

    A server is gated when its allowed policy entry (or one of its tools') has rules, a schema,
    a rate limit, a budget or an approval: the upstream then asks before each call
    (`require_approval: "always"`), and callgate answers by running the gates on the requested
    call (an approval: asking a person first).
    """
    labels: set[str] = set()
    tools = body.get("tools")
    if not isinstance(tools, list):
        return labels
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        label = tool.get("server_label")
        if not isinstance(label, str):
            continue
        prefix = f"mcp:{label}/"
        entries = [policy.tools[k] for k in (f"mcp:{label}", "mcp") if k in policy.tools][:1]
        entries += [t for k, t in policy.tools.items() if k.startswith(prefix)]
        if any(_gated(t) or not t.allow for t in entries):
            tool["require_approval"] = "always"
            labels.add(label)
    return labels


def approval_call(policy: Policy, item: dict[str, Any]) -> ToolCall:
    """The call an `mcp_approval_request` asks for, named by the policy entry that governs it."""
    label = str(item.get("server_label", ""))
    name = str(item.get("name", ""))
    key = mcp_policy_key(policy, label, name) or f"mcp:{label}"
    args = item.get("arguments")
    text = args if isinstance(args, str) else orjson.dumps(args or {}).decode()
    return ToolCall(str(item.get("id", "")), key, text)


def approvals_of(output: Any, labels: set[str]) -> list[dict[str, Any]]:
    if not isinstance(output, list) or not labels:
        return []
    return [
        item
        for item in output
        if type_of(item) == APPROVAL
        and isinstance(item.get("server_label"), str)
        and item["server_label"] in labels
    ]


def approval_response(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "mcp_approval_response",
        "approval_request_id": decision.call.id,
        "approve": decision.allowed,
    }
    if decision.block is not None:
        out["reason"] = orjson.dumps(decision.error_result()).decode()
    return out
