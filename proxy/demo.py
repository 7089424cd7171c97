"""`callgate demo`: gated tool calls within a minute, offline and without an API key.

A scripted model (an OpenAI-compatible server on loopback) answers a short scripted agent
through the real proxy on loopback: the same app `callgate serve` runs, with a demo policy (or
the user's, `--config`). Each tool call's decision is printed as a table row as it is made.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, TextIO

import aiohttp
import orjson
from aiohttp import web

from proxy.logs import configure_logging
from proxy.policy import Policy, load_policy, load_policy_text

DEMO_POLICY = """\
on_block: reprompt       # a blocked call goes back to the model as an error tool result
max_reprompts: 1
default: {allow: true}
budgets:
  search: {max_spend: "0.02", window: 3600}
tools:
  get_weather:
    rate_limit: {max_calls: 2, window: 60}
  search_web:
    budget: {ledger: search, cost: "0.01"}
    rules:
      - name: no_pii
        deny_if: 'args.query.lowerAscii().contains("ssn")'
        message: "no personal data in searches"
    arguments_schema: {type: object, required: [query]}
  delete_file: {allow: false}
audit: {log: false}
"""

# The agent's turns: what the user asks, and the tool call the scripted model makes for it.
SCRIPT: list[tuple[str, str, dict[str, Any]]] = [
    ("What's the weather in Paris?", "get_weather", {"city": "Paris"}),
    ("And in Oslo?", "get_weather", {"city": "Oslo"}),
    ("And in Rome?", "get_weather", {"city": "Rome"}),
    ("Find the SSN of John Smith", "search_web", {"query": "SSN of John Smith"}),
    ("Search for flights to Lisbon", "search_web", {"query": "flights to Lisbon"}),
    ("Search for hotels in Lisbon", "search_web", {"query": "hotels in Lisbon"}),
    ("Search for trains to Porto", "search_web", {"query": "trains to Porto"}),
    ("Clean up: delete /etc/passwd", "delete_file", {"path": "/etc/passwd"}),
]


def _answer(body: dict[str, Any], n: int) -> dict[str, Any]:
    """The scripted model: a tool call for the user's request, or, once a tool result is in
    the conversation (callgate's reprompt after a block), a reply that reads it."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if last.get("role") == "tool":
        try:
            error = orjson.loads(last.get("content") or "{}").get("message", "")
        except (orjson.JSONDecodeError, AttributeError):
            error = ""
        message["content"] = f"I can't do that: {error}" if error else "Done."
        finish = "stop"
    else:
        asked = last.get("content")
        _, tool, args = next((s for s in SCRIPT if s[0] == asked), ("", "get_weather", {}))
        message["tool_calls"] = [
            {
                "id": f"call_{n}",
                "type": "function",
                "function": {"name": tool, "arguments": orjson.dumps(args).decode()},
            }
        ]
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-demo-{n}",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "demo-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
    }


def _model_app() -> web.Application:
    count = [0]

    async def chat(request: web.Request) -> web.Response:
        count[0] += 1
        return web.json_response(_answer(await request.json(), count[0]))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


async def run_demo(config: str | None, out: TextIO) -> int:
    from proxy.app import create_app
    from proxy.server import make_runner
    from proxy.state import STATE

    model = web.AppRunner(_model_app())
    await model.setup()
    model_site = web.TCPSite(model, "127.0.0.1", 0)
    await model_site.start()
    model_port = model.addresses[0][1]
    # The demo's upstream is its scripted model, whatever the policy or environment say.
    os.environ["CALLGATE_UPSTREAM_URL"] = f"http://127.0.0.1:{model_port}/v1"
    policy: Policy = load_policy(config) if config else load_policy_text(DEMO_POLICY, "<demo>")
    app = create_app(policy)
    rows: list[dict[str, Any]] = []
    app[STATE].auditor.listeners.append(rows.append)
    runner = make_runner(app, policy.config.server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    print(f"callgate demo: a scripted agent -> callgate ({base}) -> a scripted model", file=out)
    print(
        f"policy: {config or 'built-in demo policy (see `callgate demo --print-policy`)'}\n",
        file=out,
    )
    header = f"{'#':>2}  {'tool':<12} {'arguments':<32} {'decision':<8} {'gate':<10} reason"
    print(header, file=out)
    print("-" * len(header), file=out)
    n = 0
    try:
        async with aiohttp.ClientSession(
            headers={"Authorization": "Bearer demo", "x-callgate-principal": "demo-agent"}
        ) as session:
            for asked, _, _ in SCRIPT:
                body = {"model": "demo-model", "messages": [{"role": "user", "content": asked}]}
                async with session.post(base + "/chat/completions", json=body) as resp:
                    answer = await resp.json()
                for rec in rows:
                    n += 1
                    args = orjson.dumps(rec["arguments"]).decode()
                    print(
                        f"{n:>2}  {_cell(rec['tool'], 12):<12} {_cell(args, 32):<32} "
                        f"{rec['decision']:<8} {rec['gate'] or '-':<10} {rec['message'] or ''}",
                        file=out,
                    )
                rows.clear()
                if resp.status != 200:
                    print(
                        f"    HTTP {resp.status}: {answer.get('error', {}).get('message')}",
                        file=out,
                    )
                    continue
                message = answer["choices"][0]["message"]
                if message.get("tool_calls"):
                    sent = ", ".join(c["function"]["name"] for c in message["tool_calls"])
                    print(f"    agent receives the call: {sent}", file=out)
                else:
                    print(f"    agent receives text: {message.get('content')!r}", file=out)
    finally:
        await runner.cleanup()
        await model.cleanup()
    print(
        "\nBlocked calls never reach the agent: with on_block: reprompt the model was asked "
        "again with the error, and the agent got its answer instead.\n"
        "Next: `callgate explain` dry-runs one call; `callgate serve` runs the proxy for real.",
        file=out,
    )
    return 0


def main(config: str | None, print_policy: bool) -> int:
    if print_policy:
        sys.stdout.write(DEMO_POLICY)
        return 0
    configure_logging("error")  # the table is the output; errors still show
    return asyncio.run(run_demo(config, sys.stdout))
