"""`callgate check` and `callgate explain`: exit codes, resolved output, error locations."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "callgate.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def check_errors(path: str, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["check", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing resolved is printed for a bad file
    lines = captured.err.splitlines()
    assert lines[0] == f"{path}: invalid config"
    return [line.strip() for line in lines[1:]]


def test_check_default_config_prints_resolved_policy(capsys):
    assert main(["check", str(DEFAULT_CONFIG)]) == 0
    out = capsys.readouterr().out
    first, _, body = out.partition("\n")
    assert first == f"# {DEFAULT_CONFIG}: OK"
    resolved = yaml.safe_load(body)
    assert resolved["upstream"]["base_url"] == "https://api.openai.com/v1"
    assert resolved["upstream"]["api_key"] is None  # ${OPENAI_API_KEY:-} with no key set
    assert resolved["principal"]["from"] == ["header:x-callgate-principal", "body:user", "api_key"]
    assert resolved["on_block"] == "reprompt" and resolved["max_reprompts"] == 2
    assert resolved["budgets"]["search"] == {
        "max_spend": "5.00",
        "window": 3600.0,
        "scope": "principal",
    }
    tools = resolved["tools"]
    assert tools["get_weather"]["rate_limit"]["max_calls"] == 10
    assert tools["get_weather"]["rate_limit"]["mode"] == "enforce"  # defaults filled in
    assert tools["search_web"]["budget"]["cost"] == "0.01"
    assert tools["search_web"]["rules"][0]["deny_if"] == 'args.query.lowerAscii().contains("ssn")'
    assert tools["delete_file"]["allow"] is False
    assert resolved["store"]["backend"] == "memory"


def test_check_output_is_itself_a_valid_policy(tmp_path, capsys):
    assert main(["check", str(DEFAULT_CONFIG)]) == 0
    body = capsys.readouterr().out.partition("\n")[2]
    again = write(tmp_path, body, "resolved.yaml")
    assert main(["check", again]) == 0
    assert capsys.readouterr().out.partition("\n")[2] == body


def test_check_env_expansion_and_secrets_masked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-key")
    monkeypatch.setenv("CALLGATE_UPSTREAM_URL", "http://127.0.0.1:4010/v1/")
    path = write(
        tmp_path,
        """
        upstream: {api_key: "${OPENAI_API_KEY}", timeout: "5m"}
        store: {backend: redis, url: "redis://:hunter2@127.0.0.1:6380/1", timeout: 250ms}
        """,
    )
    assert main(["check", path]) == 0
    out = capsys.readouterr().out
    assert "sk-very-secret-key" not in out and "hunter2" not in out
    resolved = yaml.safe_load(out)
    assert resolved["upstream"]["api_key"] == "***"
    assert resolved["upstream"]["base_url"] == "http://127.0.0.1:4010/v1"  # the env var wins
    assert resolved["upstream"]["timeout"] == 300.0
    assert resolved["store"]["url"] == "redis://:***@127.0.0.1:6380/1"
    assert resolved["store"]["timeout"] == 0.25


def test_check_invalid_yaml_syntax(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        on_block: strip
        tools:
          a: [1, 2
          b: 3
        """,
    )
    errors = check_errors(path, capsys)
    assert len(errors) == 1
    assert re.fullmatch(r"\(yaml\): .+ \(line 4\)", errors[0]), errors
    tab = write(tmp_path, "tools:\n\tget_weather: {}\n", "tab.yaml")
    (error,) = check_errors(tab, capsys)
    assert error.startswith("(yaml): ") and error.endswith("(line 2)")


def test_check_not_a_mapping_and_missing_file(tmp_path, capsys):
    path = write(tmp_path, "- a\n- b\n")
    assert check_errors(path, capsys) == ["(root): the policy must be a YAML mapping"]
    missing = str(tmp_path / "nope.yaml")
    assert check_errors(missing, capsys) == ["(file): No such file or directory"]


def test_check_schema_errors_all_reported_with_lines(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        upstream:
          base_url: "ftp://example.com"
        max_reprompts: lots
        principal: {from: ["cookie:session"]}
        budgets:
          search: {max_spend: "0.0000001"}
        tools:
          get_weather:
            rate_limt: {max_calls: 10}
          search_web:
            rate_limit:
              max_calls: -1
              window: "5 parsecs"
          t:
            rules:
              - name: both
                deny_if: 'true'
                allow_if: 'false'
        frobnicate: 1
        """,
    )
    errors = check_errors(path, capsys)
    assert errors == [
        "upstream.base_url: base_url must start with http:// or https:// (line 2)",
        "max_reprompts: Input should be a valid integer, unable to parse string as an integer"
        " (line 3)",
        "principal.from: unknown principal source 'cookie:session': use header:NAME, "
        "body:FIELD, metadata:KEY or api_key (line 4)",
        "budgets.search.max_spend: amount has more than 6 decimal places (line 6)",
        "tools.get_weather.rate_limt: Extra inputs are not permitted (line 9)",
        "tools.search_web.rate_limit.max_calls: Input should be greater than or equal to 0"
        " (line 12)",
        "tools.search_web.rate_limit.window: invalid duration '5 parsecs' (seconds, or e.g. "
        "'5m', '1h') (line 13)",
        "tools.t.rules.0: a rule needs exactly one of deny_if or allow_if (line 16)",
        "frobnicate: Extra inputs are not permitted (line 19)",
    ]


def test_check_bad_type_in_nested_field(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        tools:
          t:
            allow: maybe
            arguments_schema: [not, a, mapping]
        """,
    )
    errors = check_errors(path, capsys)
    assert errors == [
        "tools.t.allow: Input should be a valid boolean, unable to interpret input (line 3)",
        "tools.t.arguments_schema: Input should be a valid dictionary (line 4)",
    ]


def test_check_bad_cel_bad_schema_bad_cost(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        budgets:
          search: {max_spend: "5.00"}
        tools:
          search_web:
            rules:
              - name: ok
                deny_if: 'args.query == "x"'
              - name: no_pii
                deny_if: 'args.query.contains('
            arguments_schema: {type: objekt}
          fetch:
            budget: {ledger: search, cost: "1 +"}
        default:
          rules:
            - {name: broken, allow_if: '&&'}
        """,
    )
    errors = check_errors(path, capsys)
    assert len(errors) == 4, errors
    assert re.fullmatch(
        r"tools\.search_web\.rules\.1\.deny_if: invalid CEL expression: .+ \(line 9\)", errors[0]
    )
    assert errors[1] == (
        "tools.search_web.arguments_schema: invalid JSON Schema: "
        "'objekt' is not valid under any of the given schemas (line 10)"
    )
    assert re.fullmatch(
        r"tools\.fetch\.budget\.cost: neither a decimal amount nor a valid CEL expression: .+"
        r" \(line 12\)",
        errors[2],
    )
    assert re.fullmatch(
        r"default\.rules\.0\.allow_if: invalid CEL expression: .+ \(line 15\)", errors[3]
    )


def test_check_unknown_ledgers(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        budgets:
          search: {max_spend: "5.00"}
        tools:
          a:
            budget: {ledger: search}
          x:
            budget: {ledger: nope, cost: "0.01"}
          y:
            budget:
              cost: "0.02"
              ledger: nope2
        default:
          budget: {ledger: zz}
        """,
    )
    assert check_errors(path, capsys) == [
        "tools.x.budget.ledger: unknown ledger 'nope'; declare it under budgets (line 7)",
        "tools.y.budget.ledger: unknown ledger 'nope2'; declare it under budgets (line 11)",
        "default.budget.ledger: unknown ledger 'zz'; declare it under budgets (line 13)",
    ]


def explain(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["explain", *argv])
    return code, capsys.readouterr().out.splitlines()


def test_explain_allowed(capsys):
    code, lines = explain(
        capsys, str(DEFAULT_CONFIG), "--tool", "get_weather", "--args", '{"city": "Paris"}'
    )
    assert code == 0
    assert lines == [
        "tool: get_weather  (policy entry: 'get_weather', principal: global)",
        "  rules      pass     0 rule(s)",
        "  rate_limit pass     max_calls=10 window=60s cooldown=0s",
        "  budget     -        (not configured)",
        "decision: ALLOWED",
    ]


def test_explain_budget_and_principal(capsys):
    code, lines = explain(
        capsys,
        str(DEFAULT_CONFIG),
        "--tool",
        "search_web",
        "--args",
        '{"query": "weather"}',
        "--principal",
        "alice",
    )
    assert code == 0
    assert lines[0] == "tool: search_web  (policy entry: 'search_web', principal: alice)"
    assert lines[1] == "  rules      pass     1 rule(s), schema"
    assert lines[3] == "  budget     pass     cost 0.01 against ledger 'search' (5.00 per 3600s)"


@pytest.mark.parametrize(
    ("tool", "args", "blocked_line", "after"),
    [
        (
            "delete_file",
            "{}",
            "  rules      BLOCK    Policy violation: tool 'delete_file' is not allowed",
            "  budget     -        (not configured)",
        ),
        (
            "search_web",
            '{"query": "my SSN"}',
            "  rules      BLOCK    Policy violation: no_pii",
            "  budget     skipped  (an earlier gate blocked)",
        ),
        (
            "search_web",
            '{"q": 1}',
            "  rules      BLOCK    Invalid arguments: 'query' is a required property",
            "  budget     skipped  (an earlier gate blocked)",
        ),
    ],
)
def test_explain_blocked_by_rules(capsys, tool, args, blocked_line, after):
    code, lines = explain(capsys, str(DEFAULT_CONFIG), "--tool", tool, "--args", args)
    assert code == 2
    assert lines[1] == blocked_line
    assert lines[3] == after
    assert lines[4] == "decision: BLOCKED (on_block: reprompt)"
    assert lines[5].startswith('model sees: {"error":"tool_call_blocked","gate":"rules"')


def test_explain_invalid_json_args(capsys):
    code, lines = explain(capsys, str(DEFAULT_CONFIG), "--tool", "anything", "--args", "{bad")
    assert code == 2
    assert lines[0] == "tool: anything  (policy entry: '*', principal: global)"
    assert lines[1].startswith("  rules      BLOCK    Invalid arguments: not valid JSON")


def test_explain_budget_block_and_shadow(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        on_block: strip
        budgets:
          b: {max_spend: "1.00", window: 60}
        tools:
          pricey:
            budget: {ledger: b, cost: "0.5 * double(args.n)"}
            rate_limit: {max_calls: 0, window: 60, mode: shadow}
        """,
    )
    code, lines = explain(capsys, path, "--tool", "pricey", "--args", '{"n": 3}')
    assert code == 2
    assert lines[1:] == [
        "  rules      pass     0 rule(s)",
        "  rate_limit shadow   would block: Rate limit: 0 >= 0",
        "  budget     BLOCK    Budget exceeded: 0.00 + 1.50 > 1.00",
        "decision: BLOCKED (on_block: strip)",
        'model sees: {"error":"tool_call_blocked","gate":"budget","reason":"max_spend",'
        '"message":"Budget exceeded: 0.00 + 1.50 > 1.00"}',
    ]
    code, lines = explain(capsys, path, "--tool", "pricey", "--args", '{"n": 2}')
    assert code == 0  # 1.00 exactly reaches the limit: allowed
    assert lines[3] == "  budget     pass     cost 1.00 against ledger 'b' (1.00 per 60s)"


def test_explain_unknown_tool_denied_by_default_policy(tmp_path, capsys):
    path = write(tmp_path, "default: {allow: false}\n")
    code, lines = explain(capsys, path, "--tool", "mystery")
    assert code == 2
    assert lines[1] == "  rules      BLOCK    Policy violation: tool 'mystery' is not allowed"


def test_explain_invalid_config_exits_1(tmp_path, capsys):
    path = write(tmp_path, "max_reprompts: -1\n")
    capsys.readouterr()
    assert main(["explain", path, "--tool", "t"]) == 1
    err = capsys.readouterr().err
    assert "max_reprompts: Input should be greater than or equal to 0 (line 1)" in err


def test_check_rejects_bad_store_settings(tmp_path, capsys):
    from proxy.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("store:\n  backend: redis\n  url: http://x\n  timeout: 0\n")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "store.url: url must start with redis://, rediss:// or unix:// (line 3)" in err
    assert "store.timeout: timeout must be positive (line 4)" in err


def test_check_prints_each_tools_effective_on_block(tmp_path, capsys):
    import yaml

    from proxy.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("on_block: strip\ntools:\n  a: {}\n  b: {on_block: error}\n")
    assert main(["check", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tools"]["a"]["on_block"] == "strip"
    assert printed["tools"]["b"]["on_block"] == "error"
    assert printed["default"]["on_block"] == "strip"
