"""`callgate test`: YAML policy tests run through the real pipeline, pytest-like output, JUnit."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest

from proxy.cli import main
from proxy.policytest import build_call
from tests.native_pass import proxy_cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "callgate.yaml"
DEFAULT_TESTS = ROOT / "config" / "callgate.tests.yaml"

POLICY = """
default: {allow: false}
budgets:
  calls: {max_spend: "1.00", window: 60}
tools:
  lookup:
    rate_limit: {max_calls: 3, window: 10, cooldown: 2}
  pay:
    budget: {ledger: calls, cost: "args.amount"}
  fetch:
    rules:
      - name: internal_only
        allow_if: 'args.url.startsWith("https://intranet/")'
      - name: gpt4_only
        allow_if: 'request.model == "gpt-4o"'
  watch:
    rate_limit: {max_calls: 1, window: 60, mode: shadow}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def test_default_policy_tests_pass(capsys):
    assert main(["test", str(DEFAULT_CONFIG), str(DEFAULT_TESTS)]) == 0
    out = capsys.readouterr().out
    first, *_, last = out.splitlines()
    assert first == f"{DEFAULT_TESTS} " + "." * 10
    assert last.startswith("10 passed in ")


def test_sequences_clock_fixtures_and_expectations_all_pass(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", POLICY)
    tests = write(
        tmp_path,
        "t.yaml",
        """
        fixtures:
          intranet: {tool: fetch, args: {url: "https://intranet/wiki"}, request: {model: gpt-4o}}
        tests:
          - name: unknown tools are denied
            tool: rm
            expect: blocked
            reason: tool_not_allowed
          - name: cooldown, then the window
            tool: lookup
            args: {q: x}
            steps:
              - {expect: allowed}
              - at: +1s
                expect: blocked
                gate: rate_limit
                reason: cooldown
                message: "Cooldown: 1.0s < 2.0s"
              - {at: +1s, expect: allowed}
              - {at: +2s, expect: allowed}
              - {at: +2s, expect: blocked, reason: max_calls, message: "Rate limit: 3 >= 3"}
              - {at: 10.5s, expect: allowed}
          - name: cost from the arguments, exact decimals
            tool: pay
            steps:
              - {args: {amount: 0.7}, expect: allowed}
              - {args: {amount: 0.31}, expect: blocked, gate: budget, message: "0.70 + 0.31 > 1.00"}
              - {args: {amount: 0.3}, expect: allowed}
              - {args: {amount: "x"}, expect: blocked, gate: budget, reason: cost_error}
          - name: request facts reach the rules
            use: intranet
            expect: allowed
          - name: another model is refused
            use: intranet
            request: {model: gpt-3.5}
            expect: blocked
            message: gpt4_only
          - name: shadow blocks are recorded, not enforced
            tool: watch
            steps:
              - {expect: allowed, shadow: []}
              - {repeat: 2, expect: allowed, shadow: [rate_limit]}
        """,
    )
    assert main(["test", policy, tests]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.splitlines()[0] == f"{tests} ......"


def test_failure_prints_the_decision_trace_and_exits_1(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", POLICY)
    tests = write(
        tmp_path,
        "t.yaml",
        """
        tests:
          - name: passes
            tool: rm
            expect: blocked
          - name: too many lookups
            tool: lookup
            steps:
              - {expect: allowed}
              - {at: +3s, repeat: 3, expect: allowed}
          - name: wrong gate
            tool: fetch
            args: {url: "https://evil/"}
            expect: blocked
            gate: budget
          - name: shadow expected
            tool: watch
            steps:
              - {repeat: 2, expect: allowed, shadow: rate_limit}
        """,
    )
    junit = tmp_path / "junit.xml"
    assert main(["test", policy, tests, "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{tests} .FFF"
    assert "___ too many lookups ___" in out
    assert f"{tests}:9: expected allowed, got blocked" in out
    assert "[step 2 of 2, call 2 of 3]" in out and "at +3s" in out
    assert (
        "decision: blocked by rate_limit (cooldown, retry_after 2.000s): Cooldown: 0.0s < 2.0s"
    ) in out
    assert "expected gate 'budget', got 'rules'" in out
    assert "decision: blocked by rules (rule): Policy violation: internal_only" in out
    assert "expected shadow blocks ['rate_limit'], got []" in out  # the first call of the two
    assert out.splitlines()[-1].startswith("3 failed, 1 passed in ")

    suite = ElementTree.parse(junit).getroot()
    assert suite.tag == "testsuites" and suite.get("tests") == "4" and suite.get("failures") == "3"
    cases = suite.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == [
        "passes",
        "too many lookups",
        "wrong gate",
        "shadow expected",
    ]
    assert cases[0].find("failure") is None
    failure = cases[2].find("failure")
    assert failure is not None and failure.get("message") == "expected gate 'budget', got 'rules'"
    assert "Policy violation: internal_only" in (failure.text or "")


def test_each_case_gets_a_fresh_store(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", POLICY)
    tests = write(
        tmp_path,
        "t.yaml",
        """
        tests:
          - {name: first, tool: watch, expect: allowed, shadow: []}
          - {name: second, tool: watch, expect: allowed, shadow: []}
        """,
    )
    assert main(["test", policy, tests]) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tests:\n  - {tool: x, expect: maybe}\n", ":2: `expect` must be `allowed` or `blocked`"),
        ("tests:\n  - {tool: x, expect: allowed, gate: rules}\n", "describe a block"),
        ("tests:\n  - {expect: allowed}\n", "a call needs `tool`"),
        ("tests:\n  - {tool: x, expect: allowed, colour: red}\n", "unknown key(s) colour"),
        ("tests:\n  - {tool: x, expect: allowed, use: nope}\n", "unknown fixture 'nope'"),
        ("tests:\n  - {tool: x, expect: allowed, repeat: 0}\n", "`repeat` must be"),
        ("tests:\n  - tool: x\n    steps: [{expect: allowed, at: -3s}]\n", "`at` is `+30s`"),
        ("tests: [\n", "invalid YAML"),
        ("cases: []\n", "a mapping with a `tests:` list"),
    ],
)
def test_bad_tests_files_are_refused_with_a_location(tmp_path, capsys, text, problem):
    policy = write(tmp_path, "p.yaml", POLICY)
    tests = write(tmp_path, "t.yaml", text)
    assert main(["test", policy, tests]) == 1
    captured = capsys.readouterr()
    assert problem in captured.err and captured.err.startswith(tests)


def test_call_fields_reach_the_context():
    call, ctx = build_call(
        {
            "tool": "t",
            "args": {"a": 1},
            "principal": "ann",
            "groups": ["ops", "dev"],
            "request": {"model": "gpt-4o", "metadata": {"k": "v"}, "user": "u"},
        },
        7,
    )
    assert (call.name, call.arguments, call.id) == ("t", '{"a":1}', "call_test_7")
    assert (ctx.principal, ctx.groups, ctx.model, ctx.user) == (
        "ann",
        ("ops", "dev"),
        "gpt-4o",
        "u",
    )
    assert ctx.request_vars() == {"model": "gpt-4o", "metadata": {"k": "v"}, "user": "u"}
    raw, _ = build_call({"tool": "t", "arguments": '{"a": '}, 8)
    assert raw.arguments == '{"a": '


def test_command_line_entry_point(tmp_path):
    done = subprocess.run(
        [*proxy_cli(), "test", str(DEFAULT_CONFIG), str(DEFAULT_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "10 passed" in done.stdout
