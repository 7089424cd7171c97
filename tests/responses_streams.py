"""Builders for scripted Responses API answers (streamed and not), shaped like OpenAI's, and a
fake upstream that keeps responses by id and checks a request's tool outputs like OpenAI does.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from aiohttp import web

from tests.conftest import SSE, Received

_ids = itertools.count(1)


def _next(prefix: str) -> str:
    return f"{prefix}_{next(_ids):04d}"


def fc(name: str, args: Any = None, call_id: str | None = None) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args or {})
    return {
        "type": "function_call",
        "id": _next("fc"),
        "call_id": call_id or f"call_{name}",
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def ctc(name: str, text: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "custom_tool_call",
        "id": _next("ctc"),
        "call_id": call_id or f"call_{name}",
        "name": name,
        "input": text,
        "status": "completed",
    }


def shell(commands: list[str], call_id: str = "call_shell", **environment: Any) -> dict[str, Any]:
    """A `shell_call` (the `shell` tool); `environment` given: e.g. type="container_reference"."""
    return {
        "type": "shell_call",
        "id": _next("sh"),
        "call_id": call_id,
        "action": {"commands": commands, "timeout_ms": 60000, "max_output_length": 4096},
        "environment": environment or None,
        "status": "completed",
    }


def local_shell(command: list[str], call_id: str = "call_local") -> dict[str, Any]:
    return {
        "type": "local_shell_call",
        "id": _next("lsh"),
        "call_id": call_id,
        "action": {"type": "exec", "command": command, "env": {}, "working_directory": "/w"},
        "status": "completed",
    }


def patch(path: str, diff: str = "+x\n", call_id: str = "call_patch") -> dict[str, Any]:
    """An `apply_patch_call` updating `path`."""
    return {
        "type": "apply_patch_call",
        "id": _next("apc"),
        "call_id": call_id,
        "operation": {"type": "update_file", "path": path, "diff": diff},
        "status": "completed",
    }


def msg(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": _next("msg"),
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def rs(summary: str = "thinking") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": _next("rs"),
        "summary": [{"type": "summary_text", "text": summary}],
    }


def mcp_list(label: str, *names: str) -> dict[str, Any]:
    return {
        "type": "mcp_list_tools",
        "id": _next("mcpl"),
        "server_label": label,
        "tools": [{"name": n, "input_schema": {"type": "object"}} for n in names],
    }


def mcp_approval(label: str, name: str, args: Any, item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "mcp_approval_request",
        "id": item_id or _next("mcpr"),
        "server_label": label,
        "name": name,
        "arguments": json.dumps(args),
    }


def mcp_call(label: str, name: str, args: Any, output: str) -> dict[str, Any]:
    return {
        "type": "mcp_call",
        "id": _next("mcp"),
        "server_label": label,
        "name": name,
        "arguments": json.dumps(args),
        "output": output,
        "error": None,
        "status": "completed",
    }


USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 15,
}


def response(
    *items: dict[str, Any],
    rid: str | None = None,
    status: str = "completed",
    usage: dict[str, Any] | None = None,
    previous_response_id: str | None = None,
) -> dict[str, Any]:
    return {
        "id": rid or _next("resp"),
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": "gpt-test",
        "output": list(items),
        "parallel_tool_calls": True,
        "previous_response_id": previous_response_id,
        "store": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": usage or dict(USAGE),
    }


def sse_event(obj: dict[str, Any]) -> bytes:
    """One event as OpenAI sends it: named, compact JSON."""
    return b"event: " + obj["type"].encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"


def stream_events(resp: dict[str, Any], piece: int = 8, cut_after: int | None = None) -> list[Any]:
    """The events of a streamed response, numbered from 0 (as bytes, `event:` lines included).

    `cut_after`: stop after that many events (a truncated stream)."""
    events: list[dict[str, Any]] = []

    def add(obj: dict[str, Any]) -> None:
        obj["sequence_number"] = len(events)
        events.append(obj)

    shell = {**resp, "status": "in_progress", "output": [], "usage": None}
    add({"type": "response.created", "response": shell})
    add({"type": "response.in_progress", "response": shell})
    for index, item in enumerate(resp["output"]):
        kind = item["type"]
        if kind == "message":
            add(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "status": "in_progress", "content": []},
                }
            )
            for ci, part in enumerate(item["content"]):
                common = {"item_id": item["id"], "output_index": index, "content_index": ci}
                add({"type": "response.content_part.added", **common, "part": {**part, "text": ""}})
                words = part["text"].split(" ")
                for wi, word in enumerate(words):
                    delta = word + (" " if wi < len(words) - 1 else "")
                    add(
                        {
                            "type": "response.output_text.delta",
                            **common,
                            "delta": delta,
                            "logprobs": [],
                        }
                    )
                add(
                    {
                        "type": "response.output_text.done",
                        **common,
                        "text": part["text"],
                        "logprobs": [],
                    }
                )
                add({"type": "response.content_part.done", **common, "part": part})
        elif kind in ("function_call", "custom_tool_call"):
            field = "arguments" if kind == "function_call" else "input"
            prefix = (
                "function_call_arguments" if kind == "function_call" else "custom_tool_call_input"
            )
            add(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, field: "", "status": "in_progress"},
                }
            )
            text = item[field]
            for start in range(0, len(text), piece):
                add(
                    {
                        "type": f"response.{prefix}.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "delta": text[start : start + piece],
                    }
                )
            add(
                {
                    "type": f"response.{prefix}.done",
                    "item_id": item["id"],
                    "output_index": index,
                    field: text,
                }
            )
        elif kind == "shell_call":
            action = {**item["action"], "commands": []}
            added = {**item, "action": action, "status": "in_progress"}
            add({"type": "response.output_item.added", "output_index": index, "item": added})
            for ci, command in enumerate(item["action"]["commands"]):
                common = {"output_index": index, "command_index": ci}
                add({"type": "response.shell_call_command.added", **common, "command": ""})
                for start in range(0, len(command), piece):
                    delta = command[start : start + piece]
                    add({"type": "response.shell_call_command.delta", **common, "delta": delta})
                add({"type": "response.shell_call_command.done", **common, "command": command})
        elif kind == "apply_patch_call":
            operation = {**item["operation"], "diff": ""}
            added = {**item, "operation": operation, "status": "in_progress"}
            add({"type": "response.output_item.added", "output_index": index, "item": added})
            common = {"item_id": item["id"], "output_index": index}
            diff = item["operation"].get("diff", "")
            for start in range(0, len(diff), piece):
                delta = diff[start : start + piece]
                add(
                    {
                        "type": "response.apply_patch_call_operation_diff.delta",
                        **common,
                        "delta": delta,
                    }
                )
            add({"type": "response.apply_patch_call_operation_diff.done", **common, "diff": diff})
        elif kind == "reasoning":
            add(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "summary": []},
                }
            )
            for si, part in enumerate(item["summary"]):
                common = {"item_id": item["id"], "output_index": index, "summary_index": si}
                add(
                    {
                        "type": "response.reasoning_summary_part.added",
                        **common,
                        "part": {**part, "text": ""},
                    }
                )
                add(
                    {
                        "type": "response.reasoning_summary_text.delta",
                        **common,
                        "delta": part["text"],
                    }
                )
                add(
                    {"type": "response.reasoning_summary_text.done", **common, "text": part["text"]}
                )
                add({"type": "response.reasoning_summary_part.done", **common, "part": part})
        else:
            add({"type": "response.output_item.added", "output_index": index, "item": item})
        add({"type": "response.output_item.done", "output_index": index, "item": item})
    final = "response.completed" if resp["status"] == "completed" else f"response.{resp['status']}"
    add({"type": final, "response": resp})
    out = [sse_event(e) for e in events]
    return out[:cut_after] if cut_after is not None else out


def _error(message: str, status: int = 400, param: str | None = "input") -> web.Response:
    return web.json_response(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
        status=status,
    )


CALLS = {
    "function_call": "function call",
    "custom_tool_call": "custom tool call",
    "shell_call": "shell call",
    "local_shell_call": "local shell call",
    "apply_patch_call": "apply patch call",
}
OUTPUTS = {
    "function_call_output",
    "custom_tool_call_output",
    "shell_call_output",
    "local_shell_call_output",
    "apply_patch_call_output",
}


def _ran_upstream(output: list[Any]) -> set[Any]:
    """Calls a response answered itself (a hosted shell's `shell_call_output`)."""
    return {i.get("call_id") for i in output if i.get("type") in OUTPUTS}


class FakeResponses:
    """OpenAI's Responses API as far as conversation state goes.

    Responses are stored by id (unless `store` is false). A request must answer every tool call
    of the response it continues (`previous_response_id`) and every call in its own input, or it
    gets OpenAI's 400 "No tool output found for function call <call_id>.".
    """

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.inputs: dict[str, list[Any]] = {}
        self.conversations: dict[str, list[Any]] = {}

    def check(self, body: dict[str, Any]) -> web.Response | None:
        items = body.get("input")
        items = (
            [{"type": "message", "role": "user", "content": items}]
            if isinstance(items, str)
            else list(items or [])
        )
        answered = {
            i.get("call_id") for i in items if isinstance(i, dict) and i.get("type") in OUTPUTS
        }
        calls: list[dict[str, Any]] = []
        conv = self._conversation(body)
        if conv is not None:
            # Calls the conversation holds without an output must be answered now.
            held = self.conversations.get(conv, [])
            done = {i.get("call_id") for i in held if i.get("type") in OUTPUTS}
            calls += [i for i in held if i.get("type") in CALLS and i["call_id"] not in done]
        prev = body.get("previous_response_id")
        if prev:
            if prev not in self.stored:
                return _error(
                    f"Previous response with id '{prev}' not found.", 404, "previous_response_id"
                )
            output = self.stored[prev]["output"]
            ran = _ran_upstream(output)
            calls += [i for i in output if i.get("type") in CALLS and i["call_id"] not in ran]
        calls += [i for i in items if isinstance(i, dict) and i.get("type") in CALLS]
        for call in calls:
            if call["call_id"] not in answered:
                return _error(f"No tool output found for {CALLS[call['type']]} {call['call_id']}.")
        for item in items:
            if isinstance(item, dict) and item.get("type") in OUTPUTS:
                if item["call_id"] not in {c["call_id"] for c in calls}:
                    call_id = item["call_id"]
                    return _error(
                        f"No tool call found for function call output with call_id {call_id}."
                    )
        for pos, item in enumerate(items):
            if isinstance(item, dict) and item.get("type") == "reasoning":
                nxt = items[pos + 1] if pos + 1 < len(items) else None
                if nxt is None or nxt.get("type") not in (*CALLS, "message"):
                    return _error(
                        f"Item '{item.get('id')}' of type 'reasoning' was provided without its "
                        "required following item."
                    )
        return None

    def reply(self, resp: dict[str, Any], **stream_kw: Any) -> Any:
        """A scripted answer for `upstream.push`: validated, stored, then JSON or SSE."""

        def answer(rec: Received) -> Any:
            body = rec.body if isinstance(rec.body, dict) else {}
            bad = self.check(body)
            if bad is not None:
                return bad
            out = dict(resp)
            out["previous_response_id"] = body.get("previous_response_id")
            conv = self._conversation(body)
            if conv is not None:
                items = body.get("input")
                items = [{"role": "user", "content": items}] if isinstance(items, str) else items
                self.conversations.setdefault(conv, []).extend([*items, *out["output"]])
            if body.get("store") is False:
                out["store"] = False
            else:
                self.stored[out["id"]] = out
                items = body.get("input")
                self.inputs[out["id"]] = (
                    [{"type": "message", "role": "user", "content": items, "id": _next("msg")}]
                    if isinstance(items, str)
                    else list(items or [])
                )
            if body.get("stream"):
                return SSE(stream_events(out, **stream_kw), done=False)
            return out

        return answer

    @staticmethod
    def _conversation(body: dict[str, Any]) -> str | None:
        conv = body.get("conversation")
        return conv.get("id") if isinstance(conv, dict) else conv

    def get(self, rec: Received) -> Any:
        """Answer GET /v1/responses/{id} and /input_items from the store."""
        parts = rec.path.split("/")
        rid = parts[3]
        if rid not in self.stored:
            return _error(f"Response with id '{rid}' not found.", 404, None)
        if rec.path.endswith("/input_items"):
            data = list(reversed(self.inputs[rid]))  # newest first, like OpenAI's default
            return {
                "object": "list",
                "data": data,
                "first_id": data[0].get("id") if data else None,
                "last_id": data[-1].get("id") if data else None,
                "has_more": False,
            }
        return self.stored[rid]
