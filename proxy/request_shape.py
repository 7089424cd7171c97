"""The request fields callgate reads, checked for a shape it can read before anything goes upstream.

callgate filters `tools` (server-side tools a policy denies run at the upstream, so removing them
is the only gate they get; MCP servers get `require_approval` forced by their `server_label`),
rewrites `tool_choice`, completes `messages` / `input` with the calls it blocked earlier, and
picks its streaming gate from `stream` (and refuses `background` with client-run tools). A field
in a shape it cannot read would be skipped by that code, or crash it, while a lenient upstream
may still accept it (`"stream": "true"` or `"background": 1` pass pydantic's lax mode): so such
a request gets a 400 in OpenAI's shape, with `param` naming the field as OpenAI does
(`tools[0].function.name`).

Only shapes are checked, and only where callgate reads them; values (a `tool_choice` string,
a message's role) are the upstream's to judge. `null` stands for an absent field, as OpenAI
accepts it for optional ones (`"stream": null`). Plain isinstance checks: this runs on every
gated request.
"""

from __future__ import annotations

from typing import Any

# (message, param, code) for a 400 in OpenAI's shape.
Problem = tuple[str, str, str]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid(param: str, expected: str, value: Any) -> Problem:
    return (
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        param,
        "invalid_type",
    )


def _missing(param: str) -> Problem:
    return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"


def _optional_str(obj: dict[str, Any], key: str, where: str) -> Problem | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        return _invalid(f"{where}.{key}", "a string", value)
    return None


def _named(obj: dict[str, Any], key: str, where: str) -> Problem | None:
    """`obj[key]` must be an object with a string `name` (a chat function or custom tool)."""
    inner = obj.get(key)
    if inner is None:
        return _missing(f"{where}.{key}")
    if not isinstance(inner, dict):
        return _invalid(f"{where}.{key}", "an object", inner)
    name = inner.get("name")
    if name is None:
        return _missing(f"{where}.{key}.name")
    if not isinstance(name, str):
        return _invalid(f"{where}.{key}.name", "a string", name)
    return None


def _has_name(obj: dict[str, Any], where: str) -> Problem | None:
    name = obj.get("name")
    if name is None:
        return _missing(f"{where}.name")
    if not isinstance(name, str):
        return _invalid(f"{where}.name", "a string", name)
    return None


def _flag(body: dict[str, Any], key: str) -> Problem | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        return _invalid(key, "a boolean", value)
    return None


def _objects(body: dict[str, Any], key: str) -> tuple[list[Any] | None, Problem | None]:
    """`body[key]` as a list of objects (None when absent), or why it is not one."""
    value = body.get(key)
    if value is None:
        return None, None
    if not isinstance(value, list):
        return None, _invalid(key, "an array", value)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return None, _invalid(f"{key}[{i}]", "an object", item)
    return value, None


def _tool_type(tool: dict[str, Any], where: str) -> tuple[str | None, Problem | None]:
    kind = tool.get("type")
    if kind is not None and not isinstance(kind, str):
        return None, _invalid(f"{where}.type", "a string", kind)
    return kind, None


# -- Chat Completions ---------------------------------------------------------------------


def _chat_tool(tool: dict[str, Any], where: str) -> Problem | None:
    """A function or custom tool must carry its name where callgate looks for it (and where
    OpenAI requires it); other types are the upstream's to accept or refuse."""
    kind, problem = _tool_type(tool, where)
    if problem:
        return problem
    if kind == "function" or (kind is None and "function" in tool):
        return _named(tool, "function", where)
    if kind == "custom":
        return _named(tool, "custom", where)
    return None


def _tool_choice_kind(choice: Any) -> tuple[str | None, Problem | None]:
    """A tool_choice object's type (None also for a string or an absent one), or its problem."""
    if choice is None or isinstance(choice, str):
        return None, None
    if not isinstance(choice, dict):
        return None, _invalid("tool_choice", "a string or an object", choice)
    return _tool_type(choice, "tool_choice")


def _chat_tool_choice(choice: Any) -> Problem | None:
    kind, problem = _tool_choice_kind(choice)
    if problem or not isinstance(choice, dict):
        return problem
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools")
        if not isinstance(allowed, dict):
            return _invalid("tool_choice.allowed_tools", "an object", allowed)
        tools, problem = _objects(allowed, "tools")
        if problem:
            return _prefixed(problem, "tool_choice.allowed_tools.")
        for i, tool in enumerate(tools or []):
            problem = _chat_tool(tool, f"tool_choice.allowed_tools.tools[{i}]")
            if problem:
                return problem
        return None
    return _chat_tool(choice, "tool_choice")


def _chat_message(msg: dict[str, Any], where: str) -> Problem | None:
    problem = _optional_str(msg, "role", where)
    if problem or msg.get("role") != "assistant":
        return problem
    calls = msg.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        return _invalid(f"{where}.tool_calls", "an array", calls)
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            return _invalid(f"{where}.tool_calls[{j}]", "an object", call)
        problem = _optional_str(call, "id", f"{where}.tool_calls[{j}]")
        if problem:
            return problem
    return None


def _chat_plainly_fine(body: dict[str, Any]) -> bool:
    """True only for a body `chat_problem_reference` finds nothing in, in the shape nearly all
    requests have (messages without assistant tool calls, function tools, a string or absent
    tool_choice); anything else goes to the reference. Exact type tests: orjson's dicts,
    lists and strings are never subclasses, and a subclass here only costs the slow path.
    tests/test_request_shape.py holds the two to agreement on generated bodies."""
    stream = body.get("stream")
    if stream is not None and stream is not True and stream is not False:
        return False
    messages = body.get("messages")
    if messages is not None:
        if type(messages) is not list:
            return False
        for msg in messages:
            if type(msg) is not dict:
                return False
            role = msg.get("role")
            if type(role) is not str or role == "assistant":
                return False  # (absent roles and assistant turns: the reference decides)
    tools = body.get("tools")
    if tools is not None:
        if type(tools) is not list:
            return False
        for tool in tools:
            if type(tool) is not dict or tool.get("type") != "function":
                return False
            function = tool.get("function")
            if type(function) is not dict or type(function.get("name")) is not str:
                return False
    choice = body.get("tool_choice")
    return choice is None or type(choice) is str


def chat_problem(body: dict[str, Any]) -> Problem | None:
    """Why callgate cannot read a Chat Completions request, or None."""
    if _chat_plainly_fine(body):
        return None
    return chat_problem_reference(body)


def chat_problem_reference(body: dict[str, Any]) -> Problem | None:
    """chat_problem, field by field: the reference the fast check is held to."""
    problem = _flag(body, "stream")
    if problem:
        return problem
    messages, problem = _objects(body, "messages")
    if problem:
        return problem
    for i, msg in enumerate(messages or []):
        problem = _chat_message(msg, f"messages[{i}]")
        if problem:
            return problem
    tools, problem = _objects(body, "tools")
    if problem:
        return problem
    for i, tool in enumerate(tools or []):
        problem = _chat_tool(tool, f"tools[{i}]")
        if problem:
            return problem
    return _chat_tool_choice(body.get("tool_choice"))


# -- Responses ----------------------------------------------------------------------------


def _responses_tool(tool: dict[str, Any], where: str) -> Problem | None:
    kind, problem = _tool_type(tool, where)
    if problem:
        return problem
    if kind is None or kind in ("function", "custom"):
        if kind is None and isinstance(tool.get("function"), dict) and "name" not in tool:
            # Chat's shape, which callgate also reads (proxy.responses.tool_keys).
            return _named(tool, "function", where)
        return _has_name(tool, where)
    if kind == "mcp":
        # The label is how callgate finds the server's policy and forces its approvals.
        label = tool.get("server_label")
        if label is None:
            return _missing(f"{where}.server_label")
        if not isinstance(label, str):
            return _invalid(f"{where}.server_label", "a string", label)
    return None


def _responses_tool_choice(choice: Any) -> Problem | None:
    kind, problem = _tool_choice_kind(choice)
    if problem or not isinstance(choice, dict):
        return problem
    if kind == "allowed_tools":
        tools, problem = _objects(choice, "tools")
        if problem:
            return _prefixed(problem, "tool_choice.")
        for i, tool in enumerate(tools or []):
            problem = _tool_type(tool, f"tool_choice.tools[{i}]")[1]
            if problem:
                return problem
        return None
    if kind in ("function", "custom"):
        return _has_name(choice, "tool_choice")
    if kind == "mcp":
        return _optional_str(choice, "server_label", "tool_choice")
    return None


def _input_item(item: dict[str, Any], where: str) -> Problem | None:
    for key in ("type", "id", "call_id"):
        problem = _optional_str(item, key, where)
        if problem:
            return problem
    return None


def responses_problem(body: dict[str, Any]) -> Problem | None:
    """Why callgate cannot read a Responses request, or None."""
    problem = _flag(body, "stream") or _flag(body, "background")
    if problem:
        return problem
    raw_input = body.get("input")
    if isinstance(raw_input, list):
        for i, item in enumerate(raw_input):
            if not isinstance(item, dict):
                return _invalid(f"input[{i}]", "an object", item)
            problem = _input_item(item, f"input[{i}]")
            if problem:
                return problem
    elif raw_input is not None and not isinstance(raw_input, str):
        return _invalid("input", "a string or an array", raw_input)
    tools, problem = _objects(body, "tools")
    if problem:
        return problem
    for i, tool in enumerate(tools or []):
        problem = _responses_tool(tool, f"tools[{i}]")
        if problem:
            return problem
    return _responses_tool_choice(body.get("tool_choice"))


def _prefixed(problem: Problem, prefix: str) -> Problem:
    message, param, code = problem
    return message.replace(f"'{param}'", f"'{prefix}{param}'"), prefix + param, code
