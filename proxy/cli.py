"""`callgate serve | demo | check | explain | test | replay | keys | approvals | audit verify`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from typing import Any

import aiohttp
import orjson
import yaml
from redis.exceptions import RedisError
from yarl import URL

from proxy.approvals import ApprovalError, Approvals
from proxy.audit import GENESIS, verify_chain
from proxy.auth import keys_file, open_relay_refusal
from proxy.auth.keys import FileKeys, KeyRecord, RedisKeys, new_id, new_key
from proxy.auth.keys import digest as key_digest
from proxy.config import ConfigError, parse_duration
from proxy.gates import decide
from proxy.gates.decision import Block, Decision
from proxy.gates.registry import NAMES, OPTIONAL
from proxy.policy import Policy, ToolPolicy, load_policy
from proxy.principal import canonical
from proxy.store import StoreError
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
    from proxy.config import read_config_text
    from proxy.lint import lint

    policy = _load(args.config)
    if policy is None:
        return 1
    print(f"# {args.config}: OK")
    print(yaml.safe_dump(resolved(policy), sort_keys=False), end="")
    # Lint findings go to stderr: stdout stays the resolved policy, itself a valid file.
    findings = lint(policy, read_config_text(args.config))
    for finding in findings:
        print(finding.format(args.config), file=sys.stderr)
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    notes = len(findings) - errors - warnings
    if findings:
        counts = f"{errors} error(s), {warnings} warning(s)"
        counts += f", {notes} note(s)" if notes else ""
        print(f"{args.config}: {counts}", file=sys.stderr)
    # 0: valid, no lint errors (warnings allowed unless --strict); 1: invalid, or lint errors.
    return 1 if errors or (warnings and args.strict) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import WorkersRefused, check_workers, resolve_workers, serve
    from proxy.telemetry import TelemetryError

    try:
        workers = resolve_workers(args.workers)
    except ValueError as exc:
        print(f"--workers {args.workers}: {exc} (a count, or auto)", file=sys.stderr)
        return 2
    policy = _load(args.config)
    if policy is None:
        return 1
    refusal = open_relay_refusal(policy.config, args.host)
    if refusal is not None:
        print(f"callgate: {refusal}", file=sys.stderr)
        return 2
    try:
        check_workers(policy, workers)
    except WorkersRefused as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(policy, args.config, args.host, args.port, args.log_level, workers)
    except TelemetryError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return 1


def _key_store(policy: Policy, config_path: str) -> Any:
    config = policy.config
    if config.store.backend == "redis":
        return RedisKeys(config.store.url, config.store.key_prefix)
    return FileKeys(keys_file(config.auth, config_path))


def cmd_keys(args: argparse.Namespace) -> int:
    policy = _load(args.config)
    if policy is None:
        return 1
    auth = policy.config.auth
    if auth is None or "keys" not in auth.modes:
        print(
            f"callgate: note: {args.config} does not list `keys` in auth.modes: "
            "virtual keys authenticate nothing until it does",
            file=sys.stderr,
        )
    store = _key_store(policy, args.config)
    now = time.time()
    try:
        if args.keys_command == "create":
            return _keys_create(args, store, now)
        if args.keys_command == "list":
            for record in sorted(store.list(), key=lambda r: r.created):
                print(orjson.dumps(record.listing(now)).decode())
            return 0
        found = store.revoke(args.id, now)
    except (OSError, RedisError) as exc:
        print(f"callgate: key store unavailable: {exc}", file=sys.stderr)
        return 1
    if found is None:
        print(f"callgate: no key with id {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {found.id} (principal {found.principal})")
    return 0


def _keys_create(args: argparse.Namespace, store: Any, now: float) -> int:
    principal = args.principal.strip()
    if not principal or canonical(principal) != principal:
        print(
            "callgate: --principal must be printable text of at most 200 characters",
            file=sys.stderr,
        )
        return 1
    try:
        expires = now + parse_duration(args.expires) if args.expires else None
    except ValueError as exc:
        print(f"callgate: --expires: {exc}", file=sys.stderr)
        return 1
    key = new_key()
    record = KeyRecord(
        id=new_id(),
        digest=key_digest(key),
        principal=principal,
        groups=list(dict.fromkeys(args.group)),
        created=now,
        expires=expires,
        note=args.note,
    )
    store.add(record)
    print(f"id: {record.id}")
    print(f"principal: {record.principal}")
    print(f"groups: {', '.join(record.groups) or '-'}")
    print(f"expires: {record.listing(now)['expires'] or 'never'}")
    print("key (shown once, store it now):")
    print(key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import main as demo

    return demo(args.config, args.print_policy)


def cmd_approvals(args: argparse.Namespace) -> int:
    """Redis store: straight to the shared store (a running server puts the answer in its audit
    chain). Memory store: the approvals live in the server's process, so through its admin API
    (`--url`, the config's server.admin_token)."""
    policy = _load(args.config)
    if policy is None:
        return 1
    try:
        by = f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        by = "cli"
    comment = getattr(args, "comment", None)
    try:
        if policy.config.store.backend == "redis":
            result = asyncio.run(_approvals_direct(policy, args, by, comment))
        else:
            result = asyncio.run(_approvals_over_http(policy, args, comment))
    except ApprovalError as exc:
        print(f"callgate: {exc.message}", file=sys.stderr)
        return 1
    except (StoreError, OSError, aiohttp.ClientError) as exc:
        print(f"callgate: approvals unavailable: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, list):
        for approval in result:
            print(orjson.dumps(approval).decode())
    else:
        print(f"{result['state']} {result['id']} ({result['tool']} for {result['principal']})")
    return 0


async def _approvals_direct(
    policy: Policy, args: argparse.Namespace, by: str, comment: str | None
) -> Any:
    from proxy.store.redis import RedisStore

    cfg = policy.config.store
    store = RedisStore(cfg.url, timeout=max(cfg.timeout, 5.0), pool_size=1, prefix=cfg.key_prefix)
    service = Approvals(store, None)  # no auditor here: the events are queued for a server
    try:
        if args.approvals_command == "list":
            return await service.list(None if args.state == "all" else args.state)
        return await service.decide(args.id, args.approvals_command == "approve", by, comment)
    finally:
        await store.close()


async def _approvals_over_http(
    policy: Policy, args: argparse.Namespace, comment: str | None
) -> Any:
    token = policy.config.server.admin_token
    if token is None:
        raise ApprovalError(1, "the memory store needs server.admin_token (the admin API)")
    headers = {"Authorization": f"Bearer {token}"}
    base = args.url.rstrip("/") + "/admin/approvals"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        if args.approvals_command == "list":
            params = {} if args.state == "all" else {"state": args.state}
            async with session.get(base, headers=headers, params=params) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ApprovalError(resp.status, body["error"]["message"])
                return body["data"]
        url = f"{base}/{args.id}/{args.approvals_command}"
        async with session.post(url, headers=headers, json={"comment": comment}) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise ApprovalError(resp.status, body["error"]["message"])
            return body


def _overlay_lines(policy: Policy, effective: Policy, tp: ToolPolicy) -> list[str]:
    """Which overlays apply, and the entry they make (nothing when the policy has none)."""
    if policy.overlays is None:
        return []
    key = effective.overlay_key
    applied = [f"groups.{g}" for g in key[0]] if key else []
    if key and key[1] is not None:
        applied.append(f"principals.{key[1]}")
    lines = ["overlays: " + (", ".join(applied) if applied else "none apply")]
    if key and tp.config is not None:
        entry = tp.config.model_dump(mode="json", exclude_none=True)
        lines.append("effective entry: " + orjson.dumps(entry).decode())
    return lines


def _gate_details(tp: ToolPolicy, decision: Decision, ctx: CallContext) -> dict[str, list[str]]:
    """What each configured gate of the tool checks or reserves, by gate name."""
    details: dict[str, list[str]] = {}
    for check in tp.checks:
        details.setdefault(check.name, []).append(check.describe())
    for gate in tp.reservations:
        item = gate.request(decision, ctx) if not decision.unread else None
        described = "" if item is None or isinstance(item, Block) else gate.describe_item(item)
        details.setdefault(gate.name, []).append(described)
    return details


def _gate_lines(details: dict[str, list[str]], decision: Decision) -> list[str]:
    """One line per gate, in pipeline order: the gates after the blocking one never ran."""
    blocked_at = decision.block.gate if decision.block else None
    shadow = {b.gate: b for b in decision.shadow}
    lines: list[str] = []
    reached = True
    for name in NAMES:
        if name not in details and name in OPTIONAL:
            continue
        if name not in details:
            lines.append(f"  {name:<10} -        (not configured)")
        elif not reached:
            lines.append(f"  {name:<10} skipped  (an earlier gate blocked)")
        elif name == blocked_at and decision.block is not None:
            lines.append(f"  {name:<10} BLOCK    {decision.block.message}")
            reached = False
        elif name in shadow:
            lines.append(f"  {name:<10} shadow   would block: {shadow[name].message}")
        else:
            detail = ", ".join(d for d in details[name] if d)
            lines.append(f"  {name:<10} pass     {detail}".rstrip())
    return lines


async def _explain(
    policy: Policy, tool: str, arguments: str, principal: str, groups: tuple[str, ...] = ()
) -> list[str]:
    """One line per gate name (proxy.gates.registry.NAMES), from the tool's own gate list, as
    the overlays of the principal and groups make it."""
    store = MemoryStore()
    ctx = CallContext(principal=principal, request_id="explain", route="explain", groups=groups)
    call = ToolCall("call_explain", tool, arguments)
    decision = await decide(call, policy, store, ctx)
    effective = policy.effective(ctx)
    tp = effective.for_tool(tool)
    who = f"principal: {principal}" + (f", groups: {', '.join(groups)}" if groups else "")
    lines = [f"tool: {tool}  (policy entry: {tp.name!r}, {who})"]
    lines += _overlay_lines(policy, effective, tp)
    lines += _gate_lines(_gate_details(tp, decision, ctx), decision)
    verdict = "ALLOWED" if decision.allowed else f"BLOCKED (on_block: {tp.on_block})"
    lines.append(f"decision: {verdict}")
    if decision.block is not None:
        lines.append("model sees: " + orjson.dumps(decision.error_result()).decode())
    return lines


def cmd_explain(args: argparse.Namespace) -> int:
    policy = _load(args.config)
    if policy is None:
        return 1
    groups = tuple(dict.fromkeys(args.group))
    lines = asyncio.run(_explain(policy, args.tool, args.args, args.principal, groups))
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


def cmd_test(args: argparse.Namespace) -> int:
    import time

    from proxy import policytest

    policy = _load(args.policy)
    if policy is None:
        return 1
    cases: list[policytest.Case] = []
    problems: list[str] = []
    for path in args.tests:
        try:
            cases += policytest.load_tests_file(path)
        except policytest.TestFileError as exc:
            problems += exc.problems
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    started = time.perf_counter()
    report = policytest.run(policy, cases)
    seconds = time.perf_counter() - started
    print(policytest.format_report(report, seconds))
    if args.junit:
        with open(args.junit, "wb") as fh:
            fh.write(policytest.junit_xml(report, seconds))
    return 1 if report.failed else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from proxy import replay

    policy = _load(args.policy)
    if policy is None:
        return 1
    try:
        report = replay.replay(policy, args.files, examples=args.examples)
    except OSError as exc:
        print(f"{exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(report.as_json()).decode())
    else:
        print(replay.format_report(report, args.policy))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--workers",
        default="1",
        help="processes sharing the port (SO_REUSEPORT), each its own event loop; `auto` = the"
        " CPUs this process may use. More than 1 needs store.backend: redis",
    )
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo", help="see gated calls offline: a scripted agent and model through the proxy"
    )
    demo.add_argument("--config", default=None, help="a policy to try (default: the demo's)")
    demo.add_argument("--print-policy", action="store_true", help="print the demo policy")
    demo.set_defaults(func=cmd_demo)

    check = sub.add_parser("check", help="validate and lint a policy, and print it resolved")
    check.add_argument("config")
    check.add_argument("--strict", action="store_true", help="exit 1 on lint warnings too")
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser("explain", help="dry-run one tool call against a policy")
    explain.add_argument("config")
    explain.add_argument("--tool", required=True)
    explain.add_argument("--args", default="{}", help="the call's JSON arguments")
    explain.add_argument("--principal", default="global")
    explain.add_argument(
        "--group", action="append", default=[], help="the identity's groups (repeat for several)"
    )
    explain.set_defaults(func=cmd_explain)

    keys = sub.add_parser("keys", help="virtual keys: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key; it is printed once, last")
    create.add_argument("--principal", required=True)
    create.add_argument("--group", action="append", default=[], help="repeat for several")
    create.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
    create.add_argument("--note")
    listing = keys_sub.add_parser("list", help="one JSON line per key (never the key)")
    revoke = keys_sub.add_parser("revoke", help="stop a key working (every replica)")
    revoke.add_argument("id")
    for command in (create, listing, revoke):
        command.add_argument("--config", default=DEFAULT_CONFIG)
        command.set_defaults(func=cmd_keys)

    approvals = sub.add_parser("approvals", help="human approvals: list, approve, deny")
    approvals_sub = approvals.add_subparsers(dest="approvals_command", required=True)
    a_list = approvals_sub.add_parser("list", help="one JSON line per approval, newest first")
    a_list.add_argument(
        "--state",
        default="pending",
        choices=["pending", "approved", "denied", "used", "expired", "all"],
    )
    a_approve = approvals_sub.add_parser("approve", help="approve a pending call (single use)")
    a_deny = approvals_sub.add_parser("deny", help="deny a pending call")
    for command in (a_approve, a_deny):
        command.add_argument("id")
        command.add_argument("--comment", help="told to the model with a denial; audited")
    for command in (a_list, a_approve, a_deny):
        command.add_argument("--config", default=DEFAULT_CONFIG)
        command.add_argument(
            "--url",
            default="http://127.0.0.1:8080",
            help="the server's address (memory store only: Redis is used directly)",
        )
        command.set_defaults(func=cmd_approvals)

    test = sub.add_parser("test", help="run policy unit tests (YAML) against a policy")
    test.add_argument("policy", metavar="POLICY")
    test.add_argument("tests", nargs="+", metavar="TESTS", help="YAML files of test cases")
    test.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    test.set_defaults(func=cmd_test)

    rp = sub.add_parser("replay", help="re-decide recorded calls under another policy (what-if)")
    rp.add_argument("--policy", required=True, metavar="NEW", help="the policy to replay under")
    rp.add_argument("files", nargs="+", metavar="AUDIT", help="audit JSONL files, oldest first")
    rp.add_argument("--json", action="store_true", help="print one JSON object")
    rp.add_argument("--examples", type=int, default=5, help="examples per kind of change")
    rp.set_defaults(func=cmd_replay)

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
