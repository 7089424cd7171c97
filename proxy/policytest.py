"""`callgate test POLICY TESTS...`: policy unit tests written in YAML.

A tests file holds `tests:` (a list of cases) and optional `fixtures:` (named partial cases a
case pulls in with `use:`). A case is one tool call, or a sequence of `steps:` for the stateful
gates, each step a call that may be repeated (`repeat: 11`) and may move a simulated clock first
(`at: +30s` relative to the previous step, `at: 90s` from the sequence's start):

    fixtures:
      alice: {principal: alice, request: {model: gpt-4o}}
    tests:
      - name: deleting files is denied
        tool: delete_file
        args: {path: /etc/passwd}
        expect: blocked
        gate: rules
        reason: tool_not_allowed
        message: not allowed          # a substring of the block message
      - name: ten weather calls a minute, then the limit, then a fresh window
        use: alice
        tool: get_weather
        args: {city: Paris}
        steps:
          - {repeat: 10, expect: allowed}
          - {expect: blocked, gate: rate_limit, reason: max_calls}
          - {at: +60s, expect: allowed}

Each case (a sequence is one case) runs against a fresh in-memory store on a simulated clock,
through the real decision pipeline (`proxy.gates.decide`), so what passes here is what the proxy
decides. Allowed calls keep their rate-limit slot and budget charge, as delivered calls do.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

import orjson
import yaml

from proxy.config import line_of
from proxy.gates import Decision, decide
from proxy.policy import Policy
from proxy.store.memory import MemoryStore
from proxy.toolcalls import CallContext, ToolCall

EPOCH = 1_700_000_000.0  # where every simulated clock starts
CALL_FIELDS = ("tool", "args", "arguments", "kind", "principal", "groups", "request")
EXPECT_FIELDS = ("expect", "gate", "reason", "message", "shadow")
CASE_FIELDS = frozenset(("name", "use", "steps", "repeat", "at", *CALL_FIELDS, *EXPECT_FIELDS))
STEP_FIELDS = frozenset(("repeat", "at", *CALL_FIELDS, *EXPECT_FIELDS))
FIXTURE_FIELDS = frozenset((*CALL_FIELDS, *EXPECT_FIELDS))
MAX_REPEAT = 100_000  # a typo like `repeat: 1e9` must not hang CI
_OFFSET = re.compile(r"^\s*(\+)?\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class TestFileError(Exception):
    """A tests file that cannot be run: each problem as `FILE:LINE: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SimClock:
    """The store's wall clock, moved by the tests (and by replay) instead of by time."""

    __slots__ = ("now",)

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(slots=True)
class Step:
    call: dict[str, Any]  # the CALL_FIELDS in force for this step
    expect: str  # "allowed" | "blocked"
    gate: str | None
    reason: str | None
    message: str | None
    shadow: tuple[str, ...] | None  # gates expected to shadow-block, when asserted
    repeat: int
    at: tuple[bool, float] | None  # (relative, seconds)
    line: int | None


@dataclass(slots=True)
class Case:
    name: str
    source: str
    line: int | None
    steps: list[Step]


@dataclass(slots=True)
class Failure:
    case: Case
    step_index: int  # 1-based, for sequences
    repeat_index: int  # 1-based
    repeat: int
    offset: float  # seconds since the sequence started
    step: Step
    decision: Decision | None
    problem: str


@dataclass(slots=True)
class Result:
    case: Case
    seconds: float
    failure: Failure | None = None
    calls: int = 0


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.failure is not None]


def _parse_offset(value: Any, where: str) -> tuple[bool, float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{where}: `at` must not go back in time")
        return False, float(value)
    m = _OFFSET.match(str(value))
    if not m:
        raise ValueError(
            f"{where}: `at` is `+30s` (after the previous step) or `90s` (from the start)"
        )
    return bool(m.group(1)), float(m.group(2)) * _UNIT[m.group(3)]


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line else source


def _check_expectation(data: dict[str, Any], where: str) -> str:
    expect = data.get("expect")
    if expect not in ("allowed", "blocked"):
        raise ValueError(f"{where}: `expect` must be `allowed` or `blocked` (got {expect!r})")
    if expect == "allowed" and any(data.get(k) is not None for k in ("gate", "reason", "message")):
        raise ValueError(f"{where}: `gate`, `reason` and `message` describe a block")
    return str(expect)


def _check_call(data: dict[str, Any], where: str) -> None:
    if not isinstance(data.get("tool"), str) or not data["tool"]:
        raise ValueError(f"{where}: a call needs `tool` (a tool name)")
    if "args" in data and "arguments" in data:
        raise ValueError(f"{where}: give `args` (a value) or `arguments` (raw text), not both")
    if "arguments" in data and not isinstance(data["arguments"], str):
        raise ValueError(f"{where}: `arguments` is the raw arguments text; use `args` for a value")
    groups = data.get("groups")
    if groups is not None and not (
        isinstance(groups, list) and all(isinstance(g, str) for g in groups)
    ):
        raise ValueError(f"{where}: `groups` is a list of group names")
    request = data.get("request")
    if request is not None and not isinstance(request, dict):
        raise ValueError(f"{where}: `request` is a mapping of model, metadata, user")


def _check_repeat(data: dict[str, Any], where: str) -> int:
    repeat = data.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
        raise ValueError(f"{where}: `repeat` must be a whole number from 1 to {MAX_REPEAT}")
    return repeat


def _make_step(data: dict[str, Any], source: str, line: int | None) -> Step:
    where = _where(source, line)
    # The checks run in this order so a file's first reported problem stays the same.
    expect = _check_expectation(data, where)
    _check_call(data, where)
    repeat = _check_repeat(data, where)
    shadow = data.get("shadow")
    if shadow is not None:
        shadow = (shadow,) if isinstance(shadow, str) else tuple(str(s) for s in shadow)
    at = _parse_offset(data["at"], where) if data.get("at") is not None else None
    return Step(
        call={k: data[k] for k in CALL_FIELDS if k in data},
        expect=expect,
        gate=data.get("gate"),
        reason=data.get("reason"),
        message=None if data.get("message") is None else str(data["message"]),
        shadow=shadow,
        repeat=repeat,
        at=at,
        line=line,
    )


def _parse_yaml(text: str, source: str) -> tuple[Any, Any]:
    """The node tree (for line numbers) and the data of a tests file."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TestFileError(
            [
                f"{_where(source, mark.line + 1 if mark else None)}: invalid YAML: "
                f"{getattr(exc, 'problem', None) or exc}"
            ]
        ) from None


def _fixture_problems(node: Any, fixtures: dict[str, Any], source: str) -> list[str]:
    problems: list[str] = []
    for name, fixture in fixtures.items():
        line = line_of(node, ("fixtures", name))
        if not isinstance(fixture, dict):
            problems.append(f"{_where(source, line)}: fixture {name!r} is not a mapping")
        elif set(fixture) - FIXTURE_FIELDS:
            bad = ", ".join(sorted(set(fixture) - FIXTURE_FIELDS))
            problems.append(f"{_where(source, line)}: fixture {name!r}: unknown key(s) {bad}")
    return problems


def _merge_fixtures(raw: dict[str, Any], fixtures: dict[str, Any], where: str) -> dict[str, Any]:
    """The case's fields over the fixtures it uses, later fixtures winning."""
    merged: dict[str, Any] = {}
    uses = raw.get("use") or []
    for use in [uses] if isinstance(uses, str) else uses:
        if use not in fixtures or not isinstance(fixtures[use], dict):
            raise ValueError(f"{where}: unknown fixture {use!r}")
        merged.update(fixtures[use])
    merged.update({k: v for k, v in raw.items() if k not in ("name", "use", "steps")})
    return merged


def _sequence_steps(
    raw: dict[str, Any], merged: dict[str, Any], node: Any, source: str, i: int, where: str
) -> list[Step]:
    steps_raw = raw["steps"]
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ValueError(f"{where}: `steps` is a non-empty list")
    if "repeat" in raw or "at" in raw:
        raise ValueError(f"{where}: `repeat` and `at` belong to steps")
    # Case-level fields are each step's defaults; a step's expectation replaces the
    # case's whole expectation (a step saying `expect: allowed` drops `gate`).
    base = {k: v for k, v in merged.items() if k not in EXPECT_FIELDS}
    defaults = {k: v for k, v in merged.items() if k in EXPECT_FIELDS}
    steps: list[Step] = []
    for j, step_raw in enumerate(steps_raw):
        step_line = line_of(node, ("tests", i, "steps", j))
        step_where = _where(source, step_line)
        if not isinstance(step_raw, dict):
            raise ValueError(f"{step_where}: a step is a mapping")
        unknown = set(step_raw) - STEP_FIELDS
        if unknown:
            listed = ", ".join(sorted(unknown))
            raise ValueError(f"{step_where}: unknown key(s) {listed}")
        expect = (
            {k: step_raw[k] for k in EXPECT_FIELDS if k in step_raw}
            if "expect" in step_raw
            else defaults
        )
        fields = {**base, **step_raw, **expect}
        steps.append(_make_step(fields, source, step_line))
    return steps


def _load_case(
    raw: Any, i: int, node: Any, source: str, fixtures: dict[str, Any], names: set[str]
) -> Case:
    """Case `i` of the file; raises ValueError on its first problem (`names` collects names)."""
    line = line_of(node, ("tests", i))
    where = _where(source, line)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a test case is a mapping")
    unknown = set(raw) - CASE_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = str(raw.get("name") or f"case {i + 1}")
    if name in names:
        raise ValueError(f"{where}: duplicate test name {name!r}")
    names.add(name)
    merged = _merge_fixtures(raw, fixtures, where)
    if raw.get("steps") is None:
        steps = [_make_step(merged, source, line)]
    else:
        steps = _sequence_steps(raw, merged, node, source, i, where)
    return Case(name, source, line, steps)


def load_tests(text: str, source: str) -> list[Case]:
    """The cases of a tests file; raises TestFileError listing every problem found."""
    node, data = _parse_yaml(text, source)
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        raise TestFileError([f"{source}: a tests file is a mapping with a `tests:` list"])
    unknown_top = set(data) - {"tests", "fixtures"}
    problems: list[str] = []
    if unknown_top:
        problems.append(f"{source}: unknown top-level key(s): {', '.join(sorted(unknown_top))}")
    fixtures = data.get("fixtures") or {}
    if not isinstance(fixtures, dict):
        raise TestFileError([f"{source}: `fixtures` is a mapping of name -> partial case"])
    problems.extend(_fixture_problems(node, fixtures, source))
    # Every case is checked, so one run lists all of a file's problems, not just the first.
    cases: list[Case] = []
    names: set[str] = set()
    for i, raw in enumerate(data["tests"]):
        try:
            cases.append(_load_case(raw, i, node, source, fixtures, names))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise TestFileError(problems)
    return cases


def load_tests_file(path: str) -> list[Case]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TestFileError([f"{path}: {getattr(exc, 'strerror', None) or exc}"]) from None
    return load_tests(text, path)


def build_call(call: dict[str, Any], n: int) -> tuple[ToolCall, CallContext]:
    if "arguments" in call:
        arguments = call["arguments"]
    else:
        arguments = orjson.dumps(call.get("args", {})).decode()
    tool_call = ToolCall(f"call_test_{n}", call["tool"], arguments, call.get("kind", "function"))
    request = call.get("request") or {}
    ctx = CallContext(
        principal=str(call.get("principal", "global")),
        request_id=f"test_{n}",
        route="test",
        model=request.get("model"),
        metadata=request.get("metadata") or {},
        user=request.get("user"),
    )
    if call.get("groups"):
        ctx.groups = tuple(call["groups"])
    return tool_call, ctx


def _mismatch(step: Step, d: Decision) -> str | None:
    got = "allowed" if d.block is None else "blocked"
    if got != step.expect:
        return f"expected {step.expect}, got {got}"
    if d.block is not None:
        if step.gate is not None and d.block.gate != step.gate:
            return f"expected gate {step.gate!r}, got {d.block.gate!r}"
        if step.reason is not None and d.block.reason != step.reason:
            return f"expected reason {step.reason!r}, got {d.block.reason!r}"
        if step.message is not None and step.message not in d.block.message:
            return f"expected the message to contain {step.message!r}, got {d.block.message!r}"
    if step.shadow is not None:
        shadowed = tuple(b.gate for b in d.shadow)
        if sorted(shadowed) != sorted(step.shadow):
            return f"expected shadow blocks {list(step.shadow)}, got {list(shadowed)}"
    return None


async def run_case(policy: Policy, case: Case) -> Result:
    started = time.perf_counter()
    clock = SimClock()
    store = MemoryStore(clock=clock)
    result = Result(case, 0.0)
    n = 0
    try:
        for s, step in enumerate(case.steps, 1):
            if step.at is not None:
                relative, seconds = step.at
                clock.now = clock.now + seconds if relative else max(clock.now, EPOCH + seconds)
            for r in range(1, step.repeat + 1):
                n += 1
                try:
                    call, ctx = build_call(step.call, n)
                except ValueError as exc:
                    result.failure = Failure(
                        case, s, r, step.repeat, clock.now - EPOCH, step, None, str(exc)
                    )
                    return result
                decision = await decide(call, policy, store, ctx)
                result.calls += 1
                problem = _mismatch(step, decision)
                if problem is not None:
                    result.failure = Failure(
                        case, s, r, step.repeat, clock.now - EPOCH, step, decision, problem
                    )
                    return result
    finally:
        result.seconds = time.perf_counter() - started
    return result


async def run_all(policy: Policy, cases: list[Case]) -> Report:
    report = Report()
    for case in cases:
        report.results.append(await run_case(policy, case))
    return report


def run(policy: Policy, cases: list[Case]) -> Report:
    # One event loop for every case: decide() awaits the store inline, no task per call.
    return asyncio.run(run_all(policy, cases))


def trace(d: Decision) -> Iterator[str]:
    """What each gate did to a call: the decision trace a failure prints."""
    yield f"policy entry: {d.tool_policy!r} (on_block: {d.on_block})"
    if d.block is None:
        yield "decision: allowed"
    else:
        b = d.block
        retry = f", retry_after {b.retry_after:.3f}s" if b.retry_after is not None else ""
        yield f"decision: blocked by {b.gate} ({b.reason}{retry}): {b.message}"
    for b in d.shadow:
        yield f"shadow: {b.gate} would block ({b.reason}): {b.message}"
    for gate in d.fail_open:
        yield f"fail_open: {gate} let the call through (store error)"


def describe(f: Failure) -> list[str]:
    step = f.step
    call = step.call
    args = call["arguments"] if "arguments" in call else orjson.dumps(call.get("args", {})).decode()
    where = _where(f.case.source, step.line)
    lines = [f"{where}: {f.problem}"]
    position = []
    if len(f.case.steps) > 1:
        position.append(f"step {f.step_index} of {len(f.case.steps)}")
    if f.repeat > 1:
        position.append(f"call {f.repeat_index} of {f.repeat}")
    extra = f" [{', '.join(position)}]" if position else ""
    who = f"principal={call.get('principal', 'global')}"
    if call.get("groups"):
        who += f" groups={','.join(call['groups'])}"
    lines.append(f"call: {call['tool']}({args}) {who} at +{f.offset:g}s{extra}")
    want = step.expect
    for key in ("gate", "reason", "message"):
        value = getattr(step, key)
        if value is not None:
            want += f" {key}={value!r}"
    lines.append(f"expected: {want}")
    if f.decision is not None:
        lines += list(trace(f.decision))
    return lines


def format_report(report: Report, seconds: float) -> str:
    out: list[str] = []
    by_source: dict[str, list[Result]] = {}
    for r in report.results:
        by_source.setdefault(r.case.source, []).append(r)
    for source, results in by_source.items():
        marks = "".join("." if r.failure is None else "F" for r in results)
        out.append(f"{source} {marks}")
    failed = report.failed
    if failed:
        out.append("")
        out.append("=" * 30 + " FAILURES " + "=" * 30)
        for r in failed:
            assert r.failure is not None
            out.append(f"___ {r.case.name} ___")
            out += ["  " + line for line in describe(r.failure)]
            out.append("")
    passed = len(report.results) - len(failed)
    summary = ", ".join(
        part for part in (f"{len(failed)} failed" if failed else "", f"{passed} passed") if part
    )
    out.append(f"{summary} in {seconds:.2f}s")
    return "\n".join(out)


def junit_xml(report: Report, seconds: float) -> bytes:
    suites = ElementTree.Element(
        "testsuites",
        tests=str(len(report.results)),
        failures=str(len(report.failed)),
        time=f"{seconds:.3f}",
    )
    by_source: dict[str, list[Result]] = {}
    for r in report.results:
        by_source.setdefault(r.case.source, []).append(r)
    for source, results in by_source.items():
        suite = ElementTree.SubElement(
            suites,
            "testsuite",
            name=source,
            tests=str(len(results)),
            failures=str(sum(r.failure is not None for r in results)),
            errors="0",
            skipped="0",
            time=f"{sum(r.seconds for r in results):.3f}",
        )
        for r in results:
            case = ElementTree.SubElement(
                suite,
                "testcase",
                classname=source,
                name=r.case.name,
                time=f"{r.seconds:.6f}",
                file=source,
                line=str(r.case.line or 0),
            )
            if r.failure is not None:
                failure = ElementTree.SubElement(case, "failure", message=r.failure.problem)
                failure.text = "\n".join(describe(r.failure))
    xml: bytes = ElementTree.tostring(suites, encoding="utf-8", xml_declaration=True)
    return xml
