"""Per-group and per-principal policy overlays (proxy.overlays): the merge, field by field; the
effective policy through the real app (virtual keys, trusted_header, both APIs' request-side
tool hiding); `callgate explain`, `check` and `test` with groups."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

import proxy.policy as policy_module
from proxy.cli import main
from proxy.config import ConfigError
from proxy.gates import decide
from proxy.policy import Policy, load_policy_text
from proxy.store.memory import MemoryStore
from proxy.toolcalls import CallContext, ToolCall
from tests.conftest import completion, records
from tests.responses_streams import FakeResponses, msg, response
from tests.test_auth_keys import create_key
from tests.test_auth_trusted import client_from


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: Any) -> None:
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


BASE = """
on_block: strip
default: {allow: false, on_block: error}
tools:
  search:
    on_block: reprompt
    rate_limit: {max_calls: 2, window: 60, cooldown: 1}
    rules:
      - {name: no_ssn, deny_if: 'args.q.contains("ssn")'}
      - {name: short, deny_if: 'size(args.q) > 10'}
  delete_file: {allow: false}
"""


def load(overlays: str) -> Policy:
    return load_policy_text(textwrap.dedent(BASE) + textwrap.dedent(overlays))


def ctx(principal: str = "p", *groups: str) -> CallContext:
    return CallContext(principal, "req", "test", groups=groups)


def names(policy: Policy, tool: str, context: CallContext) -> list[str]:
    return [r.name for r in policy.for_tool(tool, context).rules]


def test_fields_merge_one_by_one_and_nested_gates_too() -> None:
    policy = load(
        """
        groups:
          eng:
            tools:
              search: {rate_limit: {max_calls: 10}}
          nolimit:
            tools:
              search: {rate_limit: null, on_block: null}
        """
    )
    search = policy.for_tool("search", ctx("p", "eng"))
    assert search.rate_limit is not None
    # Only max_calls was written: window and cooldown stay the base's, as do rules and on_block.
    assert (search.rate_limit.max_calls, search.rate_limit.window) == (10, 60.0)
    assert search.rate_limit.cooldown == 1.0
    assert [r.name for r in search.rules] == ["no_ssn", "short"]
    assert search.on_block == "reprompt"
    # null removes a gate; on_block: null falls back to the global on_block.
    bare = policy.for_tool("search", ctx("p", "nolimit"))
    assert bare.rate_limit is None and bare.on_block == "strip"
    assert bare.reservations == () and len(bare.rules) == 2
    # The base is untouched, and so is an identity without the group.
    assert policy.for_tool("search").rate_limit.max_calls == 2  # type: ignore[union-attr]
    assert policy.effective(ctx("p")) is policy
    assert policy.effective(ctx("p", "unknown-group")) is policy


def test_tool_only_in_overlay_merges_over_the_default_and_default_overlay() -> None:
    policy = load(
        """
        groups:
          ops:
            tools:
              shell: {allow: true}
          open:
            default: {allow: true}
        """
    )
    shell = policy.for_tool("shell", ctx("p", "ops"))
    # Over the base default: allowed now, the default's on_block (error) kept.
    assert shell.allow and shell.on_block == "error" and shell.name == "shell"
    assert not policy.for_tool("shell").allow
    assert not policy.for_tool("other", ctx("p", "ops")).allow
    # An overlay's default governs the tools no layer names, never a base tool entry.
    opened = policy.effective(ctx("p", "open"))
    assert opened.for_tool("anything").allow
    assert not opened.for_tool("delete_file").allow
    assert opened.tools["search"] is policy.tools["search"]  # untouched: shared, not recompiled


def test_rules_merge_by_name_or_replace_whole() -> None:
    policy = load(
        """
        groups:
          relaxed:
            tools:
              search:
                rules:
                  - {name: short, deny_if: 'size(args.q) > 100'}
                  - {name: no_secret, deny_if: 'args.q.contains("secret")'}
          fresh:
            tools:
              search:
                replace_rules: true
                rules: [{name: only, deny_if: 'args.q == "x"'}]
          none:
            tools:
              search: {replace_rules: true}
        """
    )
    relaxed = ctx("p", "relaxed")
    assert names(policy, "search", relaxed) == ["no_ssn", "short", "no_secret"]
    tool = policy.for_tool("search", relaxed)
    assert tool.rules[1].program.run({"args": {"q": "a" * 50}}) is False  # relaxed in place
    assert names(policy, "search", ctx("p", "fresh")) == ["only"]
    assert names(policy, "search", ctx("p", "none")) == []


def test_groups_apply_in_policy_order_and_the_principal_last() -> None:
    policy = load(
        """
        groups:
          first:
            tools:
              search: {rate_limit: {max_calls: 5}, rules_mode: shadow}
          second:
            tools:
              search: {rate_limit: {max_calls: 7}}
        principals:
          alice:
            tools:
              search: {rate_limit: {max_calls: 1}}
        """
    )
    for order in (("first", "second"), ("second", "first"), ("second", "x", "first", "first")):
        tool = policy.for_tool("search", ctx("bob", *order))
        assert tool.rate_limit.max_calls == 7  # type: ignore[union-attr]
        assert tool.rules_mode == "shadow"  # from `first`: second did not write it
    assert policy.effective(ctx("bob", "second", "first")).overlay_key == (
        ("first", "second"),
        None,
    )
    alice = policy.for_tool("search", ctx("alice", "second", "first"))
    assert alice.rate_limit.max_calls == 1  # type: ignore[union-attr]
    assert alice.rules_mode == "shadow"
    # Each overlay alone was compiled at load; a combination once, on first use.
    assert set(policy.overlays.policies) == {  # type: ignore[union-attr]
        (("first",), None),
        (("second",), None),
        ((), "alice"),
    }
    once = policy.effective(ctx("alice", "first", "second"))
    assert policy.effective(ctx("alice", "second", "first")) is once


def test_combinations_cache_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(policy_module, "MAX_COMBINATIONS", 2)
    groups = "\n".join(f"  g{i}: {{tools: {{search: {{allow: true}}}}}}" for i in range(4))
    policy = load("groups:\n" + groups + "\n")
    for pair in (("g0", "g1"), ("g1", "g2"), ("g2", "g3"), ("g0", "g3")):
        assert policy.effective(ctx("p", *pair)).overlay_key == (pair, None)
    combined = policy.overlays.combined  # type: ignore[union-attr]
    assert list(combined) == [(("g2", "g3"), None), (("g0", "g3"), None)]


def test_an_invalid_combination_denies_the_tool_for_that_identity() -> None:
    # Each overlay is valid alone; together they leave the rate limit nothing to limit.
    policy = load(
        """
        groups:
          a: {tools: {search: {rate_limit: {max_calls: null}}}}
          b: {tools: {search: {rate_limit: {cooldown: 0}}}}
        """
    )
    assert policy.for_tool("search", ctx("p", "a")).allow
    assert policy.for_tool("search", ctx("p", "b")).allow
    assert not policy.for_tool("search", ctx("p", "a", "b")).allow  # fail closed


async def test_an_overlay_changes_the_limit_not_the_bucket() -> None:
    policy = load(
        """
        groups:
          premium:
            tools:
              search: {rate_limit: {max_calls: 3, cooldown: 0}}
        """
    )
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])

    async def allowed(*groups: str) -> bool:
        now[0] += 2  # past the base cooldown
        call = ToolCall("c", "search", '{"q": "hi"}')
        decision = await decide(call, policy, store, ctx("alice", *groups))
        return decision.allowed

    assert [await allowed(), await allowed(), await allowed()] == [True, True, False]
    # Same bucket (rl:tools:search@alice): the premium limit counts the calls made before.
    assert [await allowed("premium"), await allowed("premium")] == [True, False]


def keys_policy(tmp_path: Path, upstream_url: str) -> tuple[dict[str, Any], str]:
    config: dict[str, Any] = {
        "upstream": {"base_url": upstream_url, "api_key": "sk-upstream"},
        "auth": {"modes": ["keys"], "keys_refresh": 0.1},
        "on_block": "strip",
        "server": {"hide_denied_tools": True},
        "tools": {"get_weather": {"allow": False}, "search": {}},
        "groups": {"weather": {"tools": {"get_weather": {"allow": True}}}},
        "principals": {"carol": {"tools": {"search": {"allow": False}}}},
    }
    path = tmp_path / "callgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, str(path)


TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "search")
]
ASK = [{"role": "user", "content": "weather?"}]


async def test_group_overlay_through_virtual_keys(
    make_proxy: Any, upstream: Any, tmp_path: Path, capsys: Any
) -> None:
    config, path = keys_policy(tmp_path, upstream.url)
    alice_key, _ = create_key(path, capsys, "--principal", "alice", "--group", "weather")
    bob_key, _ = create_key(path, capsys, "--principal", "bob")
    carol_key, _ = create_key(path, capsys, "--principal", "carol", "--group", "weather")
    proxy = await make_proxy(config, config_path=path)
    seen = records(proxy)

    def client(key: str) -> openai.AsyncOpenAI:
        made = openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0)
        proxy.clients.append(made)
        return made

    results = {}
    for who, key in (("alice", alice_key), ("bob", bob_key), ("carol", carol_key)):
        upstream.push(completion(("get_weather", {"city": "Oslo"}), ("search", {"q": "x"})))
        answer = await client(key).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
        calls = answer.choices[0].message.tool_calls or []
        results[who] = [c.function.name for c in calls]
        sent = [t["function"]["name"] for t in upstream.bodies()[-1]["tools"]]
        results[who + ".sent"] = sent
    # The group lets alice call get_weather; bob has no group; carol's principal overlay
    # (applied after her group) takes search away.
    assert results == {
        "alice": ["get_weather", "search"],
        "alice.sent": ["get_weather", "search"],
        "bob": ["search"],
        "bob.sent": ["search"],
        "carol": ["get_weather"],
        "carol.sent": ["get_weather"],
    }
    decided = {(r["principal"], r["tool"]): r["decision"] for r in seen}
    assert decided[("alice", "get_weather")] == "allowed"
    assert decided[("bob", "get_weather")] == "blocked"
    assert decided[("carol", "search")] == "blocked"


async def test_group_overlay_through_trusted_header_on_both_apis(
    make_proxy: Any, upstream: Any
) -> None:
    proxy = await make_proxy(
        {
            "upstream": {"api_key": "sk-upstream"},
            "auth": {
                "modes": ["trusted_header"],
                "trusted_header": {
                    "header": "x-forwarded-user",
                    "groups_header": "x-forwarded-groups",
                    "peers": ["127.0.0.1/32"],
                },
            },
            "on_block": "strip",
            "server": {"hide_denied_tools": True},
            "default": {"allow": False},
            "tools": {"search": {"rules": [{"name": "short", "deny_if": "size(args.q) > 3"}]}},
            "groups": {
                "research": {
                    "tools": {
                        "search": {"rules": [{"name": "short", "deny_if": "size(args.q) > 30"}]},
                        "get_weather": {"allow": True},
                    }
                }
            },
        }
    )
    seen = records(proxy)
    client = client_from(proxy, "127.0.0.1")
    long_query = ("search", {"q": "a longer query"})
    for groups in ("research", "other"):
        headers = {"x-forwarded-user": "frank", "x-forwarded-groups": groups}
        upstream.push(completion(long_query))
        await client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, extra_headers=headers
        )
        api = FakeResponses()
        upstream.push(api.reply(response(msg("ok"))))
        await client.responses.create(
            model="m",
            input="hi",
            tools=[{"type": "function", "name": n, "parameters": {}} for n in ("get_weather", "x")],
            extra_headers=headers,
        )
    assert [(r["groups"], r["decision"]) for r in seen] == [
        (["research"], "allowed"),
        (["other"], "blocked"),
    ]
    assert seen[1]["message"] == "Policy violation: short"
    sent = upstream.bodies("/v1/responses")
    assert [[t["name"] for t in body.get("tools", [])] for body in sent] == [["get_weather"], []]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


OVERLAY_POLICY = BASE + """
groups:
  eng:
    tools:
      search:
        rules:
          - {name: short, deny_if: 'size(args.q) > 100'}
principals:
  alice:
    tools:
      search: {allow: false}
"""


def test_explain_shows_the_effective_policy(tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, "p.yaml", OVERLAY_POLICY)
    args = ["explain", path, "--tool", "search", "--args", '{"q": "a long query"}']
    assert main(args) == 2
    out = capsys.readouterr().out
    assert "overlays: none apply" in out and "BLOCK    Policy violation: short" in out

    assert main([*args, "--group", "eng", "--group", "nope"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tool: search  (policy entry: 'search', principal: global, groups: eng, nope)"
    assert out[1] == "overlays: groups.eng"
    entry = json.loads(out[2].removeprefix("effective entry: "))
    assert entry["rules"][1] == {"name": "short", "deny_if": "size(args.q) > 100"}
    assert entry["rate_limit"]["max_calls"] == 2
    assert "decision: ALLOWED" in out

    assert main([*args, "--group", "eng", "--principal", "alice"]) == 2
    out = capsys.readouterr().out
    assert "overlays: groups.eng, principals.alice" in out
    assert "tool 'search' is not allowed" in out


def test_check_reports_overlay_errors_with_their_lines(tmp_path: Path, capsys: Any) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        budgets: {daily: {max_spend: "1"}}
        tools:
          search:
            rate_limit: {cooldown: 2}
        groups:
          eng:
            tools:
              search:
                rate_limit: {cooldown: 0}
                rules:
                  - {name: bad, deny_if: 'args.q ==='}
              fetch:
                budget: {cost: "0.1"}
          ops:
            default:
              budget: {ledger: nope, cost: "1"}
        principals:
          alice:
            tools:
              search: {allow: null}
        """,
    )
    assert main(["check", path]) == 1
    err = capsys.readouterr().err
    assert "principals.alice.tools.search.allow: cannot be null in an overlay" in err
    assert "(line 20)" in err
    # The first problem found (pydantic's) stops the load; fix it and see the next ones.
    text = Path(path).read_text().replace("{allow: null}", "{allow: false}")
    Path(path).write_text(text)
    assert main(["check", path]) == 1
    err = capsys.readouterr().err
    assert "groups.ops.default.budget.ledger: unknown ledger 'nope'" in err and "(line 16)" in err
    Path(path).write_text(text.replace("ledger: nope", "ledger: daily"))
    assert main(["check", path]) == 1
    err = capsys.readouterr().err.splitlines()
    assert (
        "  groups.eng.tools.search.rate_limit: rate_limit needs max_calls, cooldown, or both "
        "(line 9)"
    ) in err
    assert any(
        line.startswith("  groups.eng.tools.fetch.budget.ledger: Field required (the tool has none")
        and line.endswith("(line 13)")
        for line in err
    )
    assert any(
        line.startswith("  groups.eng.tools.search.rules.0.deny_if: invalid CEL expression")
        and line.endswith("(line 11)")
        for line in err
    )
    with pytest.raises(ConfigError):
        load_policy_text(Path(path).read_text())


def test_policy_tests_with_groups(tmp_path: Path, capsys: Any) -> None:
    policy = write(tmp_path, "p.yaml", OVERLAY_POLICY)
    tests = write(
        tmp_path,
        "t.yaml",
        """
        tests:
          - name: the base rule binds
            tool: search
            args: {q: a long query}
            expect: blocked
            message: short
          - name: the eng overlay relaxes it
            tool: search
            args: {q: a long query}
            groups: [eng]
            expect: allowed
          - name: alice's own overlay wins over her group
            tool: search
            args: {q: hi}
            principal: alice
            groups: [eng]
            expect: blocked
            reason: tool_not_allowed
        """,
    )
    assert main(["test", policy, tests]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.splitlines()[0] == f"{tests} ..."


def test_lint_checks_what_an_overlay_writes(tmp_path: Path, capsys: Any) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        budgets:
          daily: {max_spend: "1"}
        tools:
          search:
            arguments_schema:
              type: object
              properties: {q: {type: string}}
              additionalProperties: false
        groups:
          eng:
            tools:
              search:
                rules:
                  - {name: typo, deny_if: 'args.query.contains("x")'}
                budget: {ledger: daily, cost: "5"}
              Search: {allow: true}
        principals:
          alice:
            tools:
              search: {rate_limit: {max_calls: 0}}
        """,
    )
    assert main(["check", path]) == 1
    err = capsys.readouterr().err
    found = {
        (int(line.split(": ")[0].rsplit(":", 1)[1]), line.rsplit("[", 1)[1].rstrip("]"))
        for line in err.splitlines()
        if line.startswith(path + ":") and "[" in line
    }
    assert found == {
        (11, "overlay-without-auth"),  # groups: without auth no request has any
        (14, "unknown-field"),  # the merged schema (the base's) has no `query`
        (15, "unaffordable"),
        (16, "near-duplicate-name"),
        (19, "overlay-without-auth"),  # principals: claimable by any client
        (20, "zero-rate-limit"),
    }
    assert "tool 'search' in groups.eng costs 5" in err
