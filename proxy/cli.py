"""`callgate serve | demo | check | explain | audit verify [--strict]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson
import yaml
from yarl import URL

from proxy.audit import GENESIS, verify_chain
from proxy.config import ConfigError
from proxy.gates import decide
from proxy.gates.budget import cost_of, format_money
from proxy.policy import Policy, load_policy
from proxy.store.memory import MemoryStore
from proxy.toolcalls import CallContext, ToolCall

DEFAULT_CONFIG = "config/callgate.yaml"


def _load(path: str) -> Policy | None:
    try:
        return load_policy(path)
    except ConfigError as exc:
        print(f"{exc.source}: invalid config", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return None


def resolved(policy: Policy) -> dict[str, Any]:
    data = policy.config.model_dump(mode="json", by_alias=True)
    if data["upstream"].get("api_key"):
        data["upstream"]["api_key"] = "***"  # set, but never printed
    for section in ("upstream", "store"):
        for key in ("base_url", "url"):
            if isinstance(data[section].get(key), str):
                data[section][key] = _mask_url(data[section][key])
    # Resolved means what applies: each tool's effective on_block, not "inherit".
    data["default"]["on_block"] = policy.default.on_block
    for name, tool in data["tools"].items():
        tool["on_block"] = policy.tools[name].on_block
    return data


def _mask_url(url: str) -> str:
    """A URL with its password (e.g. redis://:secret@host) replaced by ***."""
    try:
        parsed = URL(url)
    except ValueError:
        return url
    if not parsed.password:
        return url
    return str(parsed.with_password("***"))


def cmd_check(args: argparse.Namespace) -> int:
    policy = _load(args.config)
    if policy is None:
        return 1
    print(f"# {args.config}: OK")
    print(yaml.safe_dump(resolved(policy), sort_keys=False), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import serve
    from proxy.telemetry import TelemetryError

    policy = _load(args.config)
    if policy is None:
        return 1
    try:
        return serve(policy, args.config, args.host, args.port, args.log_level)
    except TelemetryError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import main as demo

    return demo(args.config, args.print_policy)


async def _explain(policy: Policy, tool: str, arguments: str, principal: str) -> list[str]:
    store = MemoryStore()
    ctx = CallContext(principal=principal, request_id="explain", route="explain")
    call = ToolCall("call_explain", tool, arguments)
    decision = await decide(call, policy, store, ctx)
    tp = policy.for_tool(tool)
    lines = [f"tool: {tool}  (policy entry: {tp.name!r}, principal: {principal})"]
    blocked_at = decision.block.gate if decision.block else None
    shadow = {b.gate: b for b in decision.shadow}
    configured = {
        "rules": True,  # the allow list is always in force
        "rate_limit": tp.rate_limit is not None,
        "budget": tp.budget is not None,
    }
    reached = True
    for gate in ("rules", "rate_limit", "budget"):
        if not configured[gate]:
            lines.append(f"  {gate:<10} -        (not configured)")
            continue
        if not reached:
            lines.append(f"  {gate:<10} skipped  (an earlier gate blocked)")
            continue
        if gate == blocked_at and decision.block is not None:
            lines.append(f"  {gate:<10} BLOCK    {decision.block.message}")
            reached = False
        elif gate in shadow:
            lines.append(f"  {gate:<10} shadow   would block: {shadow[gate].message}")
        else:
            detail = ""
            if gate == "rate_limit" and tp.rate_limit:
                rl = tp.rate_limit
                detail = f"max_calls={rl.max_calls} window={rl.window:g}s cooldown={rl.cooldown:g}s"
            elif gate == "budget" and tp.budget:
                cost = cost_of(tp.budget, call, decision.args, ctx)
                detail = (
                    f"cost {format_money(cost)} against ledger {tp.budget.ledger!r} "
                    f"({tp.budget.ledger_config.max_spend} per {tp.budget.ledger_config.window:g}s)"
                )
            elif gate == "rules":
                detail = f"{len(tp.rules)} rule(s)" + (", schema" if tp.schema is not None else "")
            lines.append(f"  {gate:<10} pass     {detail}")
    verdict = "ALLOWED" if decision.allowed else f"BLOCKED (on_block: {tp.on_block})"
    lines.append(f"decision: {verdict}")
    if decision.block is not None:
        lines.append("model sees: " + orjson.dumps(decision.error_result()).decode())
    return lines


def cmd_explain(args: argparse.Namespace) -> int:
    policy = _load(args.config)
    if policy is None:
        return 1
    lines = asyncio.run(_explain(policy, args.tool, args.args, args.principal))
    print("\n".join(lines))
    # Scripts can branch on it: 0 allowed, 2 blocked.
    return 0 if any(line == "decision: ALLOWED" for line in lines) else 2


def cmd_audit_verify(args: argparse.Namespace) -> int:
    prev = GENESIS
    notes: list[str] = []
    for i, path in enumerate(args.files):
        # Rotated files, oldest first: each continues the chain where the previous one ended.
        try:
            result = verify_chain(path, prev)
        except OSError as exc:
            print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if result.problem:
            print(
                f"{path}: TAMPERED: {result.problem} ({result.records} records verified before it)"
            )
            return 1
        if result.torn_tail and i < len(args.files) - 1:
            print(f"{path}: TAMPERED: {result.torn_tail}, and another file continues it")
            return 1
        file_notes = [*result.resumptions, *([result.torn_tail] if result.torn_tail else [])]
        across = f", {len(result.resumptions)} resumption(s)" if result.resumptions else ""
        torn = ", torn tail" if result.torn_tail else ""
        status = "RESUMED" if file_notes and args.strict else "OK"
        print(f"{path}: {status}, {result.records} records, chain intact{across}{torn}")
        for note in file_notes:
            print(f"  {note}")
        notes += file_notes
        prev = result.last_hash
    # --strict: a resumption (records may have been lost to a crash) fails the check.
    return 2 if notes and args.strict else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo", help="see gated calls offline: a scripted agent and model through the proxy"
    )
    demo.add_argument("--config", default=None, help="a policy to try (default: the demo's)")
    demo.add_argument("--print-policy", action="store_true", help="print the demo policy")
    demo.set_defaults(func=cmd_demo)

    check = sub.add_parser("check", help="validate a policy and print it resolved")
    check.add_argument("config")
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser("explain", help="dry-run one tool call against a policy")
    explain.add_argument("config")
    explain.add_argument("--tool", required=True)
    explain.add_argument("--args", default="{}", help="the call's JSON arguments")
    explain.add_argument("--principal", default="global")
    explain.set_defaults(func=cmd_explain)

    audit = sub.add_parser("audit", help="audit file tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check an audit file's hash chain")
    verify.add_argument("files", nargs="+", metavar="FILE", help="rotated files: oldest first")
    verify.add_argument(
        "--strict", action="store_true", help="exit 2 if the chain was resumed after a torn write"
    )
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
