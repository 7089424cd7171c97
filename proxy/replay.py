"""`callgate replay --policy NEW.yaml AUDIT.jsonl...`: what a policy change would have decided.

Every recorded call is decided again under NEW, in recorded order, through the real pipeline
(`proxy.gates.decide`) against a fresh in-memory store whose clock reads each record's own
time, so rate limits, cooldowns and budget windows replay as they ran. Each call is then
classified against its recorded decision: unchanged, allowed->blocked, blocked->allowed, or
undecidable. Calls allowed under NEW keep their slot and charge (as delivered calls do); calls
NEW blocks consume nothing, so one change ripples into later decisions as it would have live.

What a record cannot tell:
- Redacted arguments (`audit.redact`): a value replaced by "[REDACTED]". If a rule, the
  arguments schema or the cost expression of the call's tool under NEW reads a redacted key (or
  all of `args`), the call is still decided (with the marker in place, so that state moves on)
  but counted `undecidable`, not as a change.
- Arguments recorded as a digest (`{"truncated": ...}`, `{"unserializable": ...}`): undecidable
  when NEW reads the arguments at all.
- The request facts rules may read (`request.model`, `request.metadata`, `request.user`): audit
  records do not carry them (today), so a call whose rules read `request` is undecidable unless
  the record has a `request` object.
- Records that are not policy decisions are counted apart, never as changes: `withheld` calls
  (allowed, but never delivered because a sibling failed the request), blocks by `stream` or
  `callgate` (a broken stream, an internal error), and store errors (`store_error` blocks and
  `fail_open` passes, which a replay against a healthy store cannot reproduce).
- A blocked call that was reprompted changed what the model did next; replay cannot know what the
  model would have done had it been allowed. It replays what was recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from proxy.audit import REDACTED
from proxy.gates import decide
from proxy.gates.decision import Block
from proxy.policy import Policy, ToolPolicy
from proxy.policytest import SimClock
from proxy.store.memory import MemoryStore
from proxy.toolcalls import CallContext, ToolCall

NOT_POLICY_GATES = frozenset(("stream", "callgate"))
_MARKER = orjson.dumps(REDACTED)  # b'"[REDACTED]"'
_MARKER_TEXT = _MARKER.decode()
_DIGEST_MARKERS = ("truncated", "unserializable")
# JSON Schema keywords that read only the properties they name: any other keyword may read any
# key, so a schema using one reads all of `args`.
_SCHEMA_NAMED = frozenset(
    ("type", "properties", "required", "title", "description", "$schema", "$id", "default")
)
CHANGE_KINDS = ("allowed_to_blocked", "blocked_to_allowed")


@dataclass(slots=True)
class _Reads:
    """What a tool policy's gates read of a call: the `args` keys (None: any), and `request`."""

    args: frozenset[str] | None
    any_args: bool
    request: bool


def _reads(tp: ToolPolicy) -> _Reads:
    keys: set[str] = set()
    every = False
    any_args = False
    request = False

    def expr(program: Any) -> None:
        nonlocal every, any_args, request
        if "request" in program.variables:
            request = True
        if "args" in program.variables:
            any_args = True
            if program.fields is None:
                every = True
            else:
                keys.update(program.fields)

    for rule in tp.rules:
        expr(rule.program)
    if tp.budget is not None and tp.budget.cost_program is not None:
        expr(tp.budget.cost_program)
    if tp.schema is not None:
        any_args = True
        schema = tp.schema.schema
        if not isinstance(schema, dict) or not _SCHEMA_NAMED.issuperset(schema):
            every = True
        else:
            keys.update(schema.get("properties") or {})
    return _Reads(None if every else frozenset(keys), any_args, request)


def _redacted_keys(args: Any) -> frozenset[str] | None:
    """The top-level keys whose values hold the redaction marker (None: `args` itself is, or
    it is not an object)."""
    if not isinstance(args, dict):
        return None
    return frozenset(k for k, v in args.items() if _MARKER in orjson.dumps(v))


@dataclass
class Change:
    kind: str
    tool: str
    principal: str
    gate: str  # the blocking gate: NEW's for allowed->blocked, the recorded one otherwise
    example: dict[str, Any]


@dataclass
class ReplayReport:
    total: int = 0  # call records read
    unchanged: int = 0
    blocked_differently: int = 0  # blocked both times, by another gate or reason
    undecidable: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # not policy decisions
    changes: dict[str, Counter[tuple[str, str]]] = field(
        default_factory=lambda: {k: Counter() for k in CHANGE_KINDS}
    )
    examples: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {k: [] for k in CHANGE_KINDS}
    )
    other_lines: Counter[str] = field(default_factory=Counter)  # resume records, unreadable
    seconds: float = 0.0

    def count(self, kind: str) -> int:
        return sum(n for (dim, _), n in self.changes[kind].items() if dim == "tool")

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total": self.total,
            "allowed_to_blocked": self.count("allowed_to_blocked"),
            "blocked_to_allowed": self.count("blocked_to_allowed"),
            "unchanged": self.unchanged,
            "blocked_differently": self.blocked_differently,
            "undecidable": sum(self.undecidable.values()),
            "undecidable_by_reason": dict(self.undecidable),
            "not_policy_decisions": dict(self.skipped),
            "other_lines": dict(self.other_lines),
            "seconds": round(self.seconds, 3),
        }
        for kind in CHANGE_KINDS:
            by: dict[str, dict[str, int]] = {"tool": {}, "gate": {}, "principal": {}}
            for (dim, value), n in self.changes[kind].most_common():
                by[dim][value] = n
            out[f"{kind}_by"] = by
            out[f"{kind}_examples"] = self.examples[kind]
        return out


_second_cache: dict[str, float] = {}


def parse_time(text: str) -> float:
    """Epoch seconds of an audit record's `time` (`utc_iso`'s fixed format, parsed without
    datetime for all but the first record of each second)."""
    if len(text) == 32 and text[19] == "." and text.endswith("+00:00"):
        head = text[:19]
        second = _second_cache.get(head)
        if second is None:
            if len(_second_cache) > 100_000:
                _second_cache.clear()
            second = _second_cache[head] = datetime.fromisoformat(head + "+00:00").timestamp()
        return second + int(text[20:26]) * 1e-6
    return datetime.fromisoformat(text).timestamp()


def read_records(paths: Iterable[str], report: ReplayReport) -> Iterator[dict[str, Any]]:
    """The call records of audit files, in order (rotated files: oldest first)."""
    loads = orjson.loads
    for path in paths:
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    record = loads(line)
                except orjson.JSONDecodeError:
                    if line.strip():
                        report.other_lines["unreadable"] += 1
                    continue
                if type(record) is not dict or "tool" not in record or "decision" not in record:
                    # Resume records, and events (an approval approved, ...): not decisions.
                    kind = next(
                        (k for k in ("resume", "event") if type(record) is dict and k in record),
                        "unreadable",
                    )
                    report.other_lines[kind] += 1
                    continue
                yield record


_UNPARSED_ARGS = ("Invalid arguments: not valid JSON", "Invalid arguments: nested deeper")


def _skip_reason(record: dict[str, Any], clock: SimClock) -> str | None:
    """Why a record cannot be replayed as a policy decision (None: it can; the clock is set)."""
    recorded = record["decision"]
    gate = record.get("gate")
    if recorded == "withheld":
        return "withheld"
    if recorded == "blocked" and gate in NOT_POLICY_GATES:
        return f"blocked_by_{gate}"
    if record.get("reason") == "store_error" or record.get("fail_open"):
        return "store_error"
    try:
        clock.now = parse_time(record["time"])
    except (KeyError, TypeError, ValueError):
        return "no_time"
    return None


def _arguments_text(record: dict[str, Any], args: Any) -> str:
    if (
        type(args) is str
        and record.get("reason") == "invalid_arguments"
        and str(record.get("message") or "").startswith(_UNPARSED_ARGS)
    ):
        return args  # it never parsed: the record holds the text as sent
    return orjson.dumps(args).decode()


def _context(record: dict[str, Any], principal: str, request: Any) -> CallContext:
    ctx = CallContext(principal, str(record.get("request_id") or ""), "replay")
    groups = record.get("groups")
    if groups:
        ctx.groups = tuple(str(g) for g in groups)
    if isinstance(request, dict):
        ctx.model = request.get("model")
        ctx.metadata = request.get("metadata") or {}
        ctx.user = request.get("user")
    return ctx


def _doubt(reads: _Reads, args: Any, text: str, request: Any) -> str | None:
    """Why the recorded arguments and request may not have decided this call (None: they did)."""
    if reads.any_args:
        if type(args) is dict and "preview" in args and any(m in args for m in _DIGEST_MARKERS):
            return "digest_arguments"
        if _MARKER_TEXT in text:
            hidden = _redacted_keys(args)
            if hidden is None or reads.args is None or not hidden.isdisjoint(reads.args):
                return "redacted_arguments"
    if reads.request and not isinstance(request, dict):
        return "request_facts_not_recorded"
    return None


def _count_change(
    report: ReplayReport,
    record: dict[str, Any],
    block: Block | None,
    tool: str,
    principal: str,
    examples: int,
) -> None:
    """Count a call whose decision flipped, and keep it as an example while there is room."""
    if block is not None:
        kind, by_gate = "allowed_to_blocked", block.gate
        now: dict[str, Any] = {
            "decision": "blocked",
            "gate": block.gate,
            "reason": block.reason,
            "message": block.message,
        }
    else:
        kind, by_gate = "blocked_to_allowed", str(record.get("gate"))
        now = {"decision": "allowed"}
    counter = report.changes[kind]
    counter["tool", tool] += 1
    counter["gate", by_gate] += 1
    counter["principal", principal] += 1
    if len(report.examples[kind]) < examples:
        report.examples[kind].append(
            {
                "time": record.get("time"),
                "request_id": record.get("request_id"),
                "call_id": record.get("call_id"),
                "tool": tool,
                "principal": principal,
                "was": {k: record.get(k) for k in ("decision", "gate", "reason", "message")},
                "now": now,
            }
        )


async def _replay(
    policy: Policy, records: Iterable[dict[str, Any]], report: ReplayReport, examples: int
) -> None:
    clock = SimClock(0.0)
    store = MemoryStore(clock=clock)
    reads_of: dict[tuple[str, Any], _Reads] = {}
    for record in records:
        report.total += 1
        skip = _skip_reason(record, clock)
        if skip is not None:
            report.skipped[skip] += 1
            continue
        tool = str(record["tool"])
        principal = str(record.get("principal") or "global")
        args = record.get("arguments")
        text = _arguments_text(record, args)
        request = record.get("request")
        ctx = _context(record, principal, request)
        call = ToolCall(str(record.get("call_id") or ""), tool, text)
        decision = await decide(call, policy, store, ctx)

        # The call is decided even when in doubt, so that state moves on as it did live.
        effective = policy.effective(ctx)  # the overlays of the recorded identity
        reads_key = (decision.tool_policy, effective.overlay_key)
        reads = reads_of.get(reads_key)
        if reads is None:
            reads = reads_of[reads_key] = _reads(effective.for_tool(tool))
        doubt = _doubt(reads, args, text, request)
        if doubt is not None:
            report.undecidable[doubt] += 1
            continue

        block = decision.block
        if (record["decision"] == "allowed") == (block is None):
            report.unchanged += 1
            if block is not None and (block.gate, block.reason) != (
                record.get("gate"),
                record.get("reason"),
            ):
                report.blocked_differently += 1
            continue
        _count_change(report, record, block, tool, principal, examples)


def replay(policy: Policy, paths: list[str], examples: int = 5) -> ReplayReport:
    report = ReplayReport()
    started = time.perf_counter()
    # One event loop for the whole replay: decide() awaits the memory store inline, with no
    # task per call (a task per record would cost more than the decision).
    asyncio.run(_replay(policy, read_records(paths, report), report, examples))
    report.seconds = time.perf_counter() - started
    return report


def format_report(report: ReplayReport, policy_source: str) -> str:
    a2b = report.count("allowed_to_blocked")
    b2a = report.count("blocked_to_allowed")
    undecidable = sum(report.undecidable.values())
    lines = [
        f"replayed {report.total} recorded calls under {policy_source} in {report.seconds:.2f}s",
        f"  unchanged           {report.unchanged}"
        + (
            f" ({report.blocked_differently} blocked by another gate or reason)"
            if report.blocked_differently
            else ""
        ),
        f"  allowed -> blocked  {a2b}",
        f"  blocked -> allowed  {b2a}",
    ]
    if undecidable:
        why = ", ".join(f"{k}: {n}" for k, n in report.undecidable.most_common())
        lines.append(f"  undecidable         {undecidable} ({why})")
    if report.skipped:
        why = ", ".join(f"{k}: {n}" for k, n in report.skipped.most_common())
        lines.append(f"  not policy decisions {sum(report.skipped.values())} ({why})")
    for kind, title in zip(CHANGE_KINDS, ("allowed -> blocked", "blocked -> allowed"), strict=True):
        counter = report.changes[kind]
        if not counter:
            continue
        lines.append("")
        lines.append(f"{title}:")
        for dim in ("tool", "gate", "principal"):
            top = [(v, n) for (d, v), n in counter.most_common() if d == dim]
            shown = ", ".join(f"{v} {n}" for v, n in top[:10])
            more = f", ... {len(top) - 10} more" if len(top) > 10 else ""
            lines.append(f"  by {dim + ':':<10} {shown}{more}")
        for ex in report.examples[kind]:
            was, now = ex["was"], ex["now"]
            said = f"{was['gate']}: {was['message']}" if was["decision"] == "blocked" else ""
            new = f"{now['gate']}: {now['message']}" if now["decision"] == "blocked" else ""
            lines.append(
                f"  e.g. {ex['time']} {ex['tool']}@{ex['principal']} call {ex['call_id']} "
                f"(request {ex['request_id']}): was {was['decision']}"
                + (f" ({said})" if said else "")
                + f", now {now['decision']}"
                + (f" ({new})" if new else "")
            )
    return "\n".join(lines)
