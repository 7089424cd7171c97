"""`callgate check` lint: findings with file, line, severity and hint; exit codes; --strict."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.lint import check_expression, lint, normalize
from proxy.policy import load_policy_text
from tests.native_pass import proxy_cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "callgate.yaml"
SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def codes(findings) -> list[tuple[str, str, int | None]]:
    return [(f.severity, f.code, f.line) for f in findings]


def test_default_policy_is_clean(capsys):
    assert main(["check", "--strict", str(DEFAULT_CONFIG)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('args.query.contains("x")', []),
        ('args.qeury.contains("x")', [("error", "unknown-field")]),
        ('has(args.qeury) && args.query == ""', [("warning", "unknown-field")]),
        ("args.query > 5", [("error", "type")]),
        ("args.limit > 5 && args.limit <= 10.5", []),  # int and double compare in CEL
        ('args.limit == "10"', [("warning", "type")]),
        ('args.limit + "x" == "1x"', [("error", "type")]),
        ('args.limit.startsWith("1")', [("error", "type")]),
        ('args.tags.exists(t, t.startsWith("a"))', []),
        ("args.tags.exists(t, t > 3)", [("error", "type")]),
        ('args["query"] == 1', [("warning", "type")]),
        ('"x" in args.query', [("error", "type")]),
        ('arg.query == "x"', [("error", "unknown-variable")]),
        ('request.model == "gpt-4o" && request.user != ""', []),
        ('request.modle == "gpt-4o"', [("error", "unknown-field")]),
        ('principal.startsWith("svc-") || tool == "x"', []),
        ("args.query == null", []),
    ],
)
def test_expression_checks(source, expected):
    got = [(severity, code) for severity, code, _ in check_expression(source, SCHEMA)]
    assert got == expected


def test_open_schema_warns_without_a_schema_says_nothing():
    open_schema = {"type": "object", "properties": {"url": {"type": "string"}}}
    [(severity, code, message)] = check_expression('args.uri.contains("x")', open_schema)
    assert (severity, code) == ("warning", "unknown-field") and "it has: url" in message
    assert check_expression('args.uri.contains("x")', None) == []
    # A schema without properties names no fields: nothing to compare against.
    assert check_expression("args.q == 1", {"type": "object", "required": ["q"]}) == []


def test_names_match_exactly_and_near_duplicates_are_found():
    assert normalize("Delete-File") == normalize("delete_file") == normalize("delete.file")
    policy = load_policy_text("tools: {delete_file: {allow: false}, Delete-File: {}}\n")
    assert policy.for_tool("Delete-File").name == "Delete-File"  # exact, not normalized
    assert policy.for_tool("DELETE_FILE").name == "*"
    [finding] = lint(policy, "tools: {delete_file: {allow: false}, Delete-File: {}}\n")
    assert (finding.severity, finding.code) == ("warning", "near-duplicate-name")
    assert "'delete_file', 'Delete-File'" in finding.message
    assert "default: {allow: false}" in finding.hint


POLICY = """
budgets:
  search: {max_spend: "1.00"}
  orphan: {max_spend: "1.00"}
tools:
  search_web:
    budget: {ledger: search, cost: "2.00"}
    arguments_schema:
      type: object
      properties: {query: {type: string}}
      additionalProperties: false
    rules:
      - {name: typo, deny_if: 'args.qeury.contains("x")'}
      - {name: always, deny_if: 'true || args.query == "x"'}
      - {name: never, allow_if: '1 == 1'}
      - {name: fine, deny_if: 'args.query.contains("ssn")'}
  fetch:
    rate_limit: {max_calls: 0}
    rules:
      - {name: self, deny_if: 'tool == "fetch"'}
      - {name: number, deny_if: '1 + 1'}
  paid:
    budget: {ledger: search, cost: "0.5 * size(args.items)"}
  gone: {allow: false, rules: [{name: r, deny_if: 'false'}]}
"""


def test_findings_with_lines_and_hints(tmp_path, capsys):
    path = write(tmp_path, POLICY)
    assert main(["check", path]) == 1  # errors
    captured = capsys.readouterr()
    assert captured.out.startswith(f"# {path}: OK\n")  # the resolved policy still prints
    err = captured.err
    assert f"{path}:3: warning: ledger 'orphan' is charged by no tool [unused-ledger]" in err
    assert f"{path}:6: error: tool 'search_web' costs 2.00 but ledger 'search' allows 1.00" in err
    assert f"{path}:12: error: rule 'typo': `args.qeury`" in err
    assert f"{path}:13: error: rule 'always' (deny_if) matches every call" in err
    assert "  hint: to deny the tool, write allow: false" in err
    assert f"{path}:14: warning: rule 'never' (allow_if) never blocks: it is always true" in err
    assert f"{path}:17: warning: tool 'fetch' allows 0 calls per window" in err
    assert f"{path}:19: error: rule 'self' (deny_if) matches every call" in err
    assert f"{path}:20: error: rule 'number' always returns int, not a bool" in err
    assert f"{path}:23: warning: tool 'gone' is `allow: false`: its rules never apply" in err
    assert ":15:" not in err  # the fine rule
    assert ":22:" not in err  # a cost over args: not constant, no schema to check against
    assert err.rstrip().endswith(f"{path}: 5 error(s), 5 warning(s)")  # + gone's dead rule


def test_warnings_pass_unless_strict(tmp_path, capsys):
    path = write(tmp_path, 'budgets: {unused: {max_spend: "1"}}\n')
    assert main(["check", path]) == 0
    assert "[unused-ledger]" in capsys.readouterr().err
    assert main(["check", "--strict", path]) == 1


def test_a_wildcard_rule_reading_tool_is_not_constant(tmp_path, capsys):
    # For the `*` policy the tool name is not known: `tool == "x"` depends on the call.
    path = write(tmp_path, "default: {rules: [{name: r, deny_if: 'tool == \"x\"'}]}\n")
    assert main(["check", "--strict", path]) == 0
    assert capsys.readouterr().err == ""


def test_invalid_config_still_exits_1_without_lint(tmp_path):
    path = write(tmp_path, "tools: {x: {rules: [{name: r, deny_if: '1 +'}]}}\n")
    done = subprocess.run(
        [*proxy_cli(), "check", path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 1
    assert "invalid CEL expression" in done.stderr and "[" not in done.stdout


def test_a_rule_left_to_the_interpreter_is_noted_and_never_fails_the_check(tmp_path, capsys):
    """What the compiled CEL form does not translate runs in the interpreter on every call: a
    note says so and why (a `matches` pattern outside the subset costs the most), and a note
    fails neither the check nor --strict."""
    path = write(
        tmp_path,
        """
        tools:
          search:
            rules:
              - name: compiled
                deny_if: 'args.query.matches("^\\\\$\\\\(") || args.query.matches("\\\\d{3}")'
              - name: letters
                deny_if: 'args.query.matches("\\\\pL{40}")'
              - name: unsigned
                deny_if: 'size(args.query) > 10u'
        """,
    )
    assert main(["check", "--strict", path]) == 0
    err = capsys.readouterr().err
    assert ":5:" not in err  # the compiled rule: nothing to say
    assert f"{path}:7: note: rule 'letters' runs in the CEL interpreter (the pattern" in err
    assert "the interpreter compiles the pattern each time [interpreted-rule]" in err
    assert f"{path}:9: note: rule 'unsigned' runs in the CEL interpreter (uint or hex" in err
    assert "about 5 µs a call" in err
    assert err.rstrip().endswith(f"{path}: 0 error(s), 0 warning(s), 2 note(s)")
