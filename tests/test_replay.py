"""`callgate replay`: an audit file made by a real callgate under concurrent load, replayed under a
stricter and a looser policy, with the counts checked against a hand-computed expectation; and
the records replay cannot judge (redacted arguments, digests, request facts, non-policy blocks).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cli import main
from proxy.policy import load_policy_text
from proxy.replay import parse_time, replay
from proxy.timestamps import utc_iso
from tests.conftest import Received, completion
from tests.native_pass import proxy_cli

ROOT = Path(__file__).resolve().parent.parent
PRINCIPALS = ("ann", "ben", "cat")
# Per principal, in this order: 8 lookups, 7 searches, 2 evil and 2 fine fetches, 2 logins.
CALLS = (
    [("lookup", {"q": f"q{i}"}) for i in range(8)]
    + [("search", {"query": f"s{i}"}) for i in range(7)]
    + [("fetch", {"url": "https://evil.example/x"}), ("fetch", {"url": "https://ok.example/"})] * 2
    + [("login", {"user": "ann", "password": "hunter2"})] * 2
)
RECORDED = """
on_block: strip
budgets:
  search: {max_spend: "0.05", window: 3600}
tools:
  lookup: {rate_limit: {max_calls: 5, window: 60}}
  search: {budget: {ledger: search, cost: "0.01"}}
  fetch:
    rules: [{name: no_evil, deny_if: 'args.url.contains("evil")'}]
  login:
    rules: [{name: no_root, deny_if: 'args.user == "root"'}]
audit: {log: false, redact: [password]}
"""
# Per principal: lookup 3 of 8 (was 5: 2 a->b), search at 0.02 is 2 of 7 (was 5: 3 a->b);
# login now reads the redacted password: its 2 calls are undecidable.
STRICTER = """
budgets:
  search: {max_spend: "0.05", window: 3600}
tools:
  lookup: {rate_limit: {max_calls: 3, window: 60}}
  search: {budget: {ledger: search, cost: "0.02"}}
  fetch:
    rules: [{name: no_evil, deny_if: 'args.url.contains("evil")'}]
  login:
    rules: [{name: password_set, deny_if: 'args.password == ""'}]
"""
# Per principal: 8 of 8 lookups (3 b->a), searches unbudgeted (2 b->a), fetch unruled (2 b->a);
# login reads only the user, which was not redacted: decidable, unchanged.
LOOSER = """
tools:
  lookup: {rate_limit: {max_calls: 10, window: 60}}
  login:
    rules: [{name: no_root, deny_if: 'args.user == "root"'}]
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("CALLGATE_UPSTREAM_URL", raising=False)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def answer(rec: Received) -> dict[str, Any]:
    """The model calls the tool the request's last message names (so concurrent requests each
    get their own call, whatever order they reach the upstream in)."""
    wanted = json.loads(rec.body["messages"][-1]["content"])
    return completion((wanted["tool"], wanted["args"]), ids=[wanted["id"]])


@pytest.fixture
async def recorded_audit(make_proxy, upstream, tmp_path) -> Path:
    path = tmp_path / "audit.jsonl"
    config = RECORDED.replace("audit: {log: false,", f"audit: {{log: false, file: '{path}',")
    proxy = await make_proxy(config)
    client = proxy.client()
    work = [
        (principal, i, tool, args)
        for i, (tool, args) in enumerate(CALLS)
        for principal in PRINCIPALS
    ]
    upstream.push(*([answer] * len(work)))
    gate = asyncio.Semaphore(16)  # bounded concurrency: 16 requests in flight

    async def one(principal: str, i: int, tool: str, args: dict[str, Any]) -> None:
        content = json.dumps({"tool": tool, "args": args, "id": f"c_{principal}_{i}"})
        async with gate:
            await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": content}],
                extra_headers={"x-callgate-principal": principal},
            )

    await asyncio.wait_for(asyncio.gather(*(one(*w) for w in work)), 60)
    await proxy.state.auditor.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(work) == 63
    decided = [r["decision"] for r in records]
    assert decided.count("allowed") == 42 and decided.count("blocked") == 21
    assert all(r["arguments"]["password"] == "[REDACTED]" for r in records if r["tool"] == "login")
    return path


def test_replay_under_the_recorded_policy_changes_nothing(recorded_audit, tmp_path, capsys):
    same = write(tmp_path, "same.yaml", RECORDED)
    assert main(["replay", "--policy", same, str(recorded_audit), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["total"] == 63 and got["unchanged"] == 63
    assert got["allowed_to_blocked"] == got["blocked_to_allowed"] == got["undecidable"] == 0


def test_replay_under_a_stricter_policy(recorded_audit, tmp_path, capsys):
    stricter = write(tmp_path, "stricter.yaml", STRICTER)
    assert main(["replay", "--policy", stricter, str(recorded_audit), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["total"] == 63
    assert got["allowed_to_blocked"] == 3 * (2 + 3)
    assert got["blocked_to_allowed"] == 0
    assert got["undecidable"] == 6
    assert got["undecidable_by_reason"] == {"redacted_arguments": 6}
    assert got["unchanged"] == 63 - 15 - 6
    by = got["allowed_to_blocked_by"]
    assert by["tool"] == {"search": 9, "lookup": 6}
    assert by["gate"] == {"budget": 9, "rate_limit": 6}
    assert by["principal"] == {"ann": 5, "ben": 5, "cat": 5}
    examples = got["allowed_to_blocked_examples"]
    assert len(examples) == 5
    assert all(e["was"]["decision"] == "allowed" for e in examples)
    assert {e["now"]["gate"] for e in examples} <= {"budget", "rate_limit"}

    # The text report says the same.
    assert main(["replay", "--policy", stricter, str(recorded_audit)]) == 0
    out = capsys.readouterr().out
    assert f"replayed 63 recorded calls under {stricter}" in out
    assert "allowed -> blocked  15" in out and "blocked -> allowed  0" in out
    assert "undecidable         6 (redacted_arguments: 6)" in out
    assert "by tool:      search 9, lookup 6" in out
    assert "was allowed, now blocked (rate_limit: Rate limit: 3 >= 3)" in out


def test_replay_under_a_looser_policy(recorded_audit, tmp_path, capsys):
    looser = write(tmp_path, "looser.yaml", LOOSER)
    assert main(["replay", "--policy", looser, str(recorded_audit), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["total"], got["allowed_to_blocked"], got["blocked_to_allowed"]) == (63, 0, 21)
    assert got["unchanged"] == 42 and got["undecidable"] == 0
    by = got["blocked_to_allowed_by"]
    assert by["tool"] == {"lookup": 9, "search": 6, "fetch": 6}
    assert by["gate"] == {"rate_limit": 9, "budget": 6, "rules": 6}
    assert got["blocked_to_allowed_examples"][0]["now"] == {"decision": "allowed"}


def record(n: int, tool: str, decision: str = "allowed", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": utc_iso(1_750_000_000 + n),
        "request_id": f"r{n}",
        "route": "chat.completions",
        "principal": "p",
        "tool": tool,
        "policy": tool,
        "call_id": f"c{n}",
        "decision": decision,
        "gate": None,
        "reason": None,
        "message": None,
        "action": None,
        "shadow": [],
        "fail_open": [],
        "arguments": {},
        "latency_ms": 0.01,
    }
    base.update(extra)
    return base


def write_audit(tmp_path: Path, records: list[dict[str, Any]]) -> str:
    path = tmp_path / "synthetic.jsonl"
    lines = [orjson.dumps(r) for r in records]
    path.write_bytes(b"\n".join(lines) + b'\n{"time": "x", "resume": {}}\nnot json\n')
    return str(path)


def test_what_replay_cannot_judge_is_counted_apart(tmp_path):
    policy = load_policy_text(
        textwrap.dedent(
            """
            tools:
              fetch:
                rules: [{name: gpt4, allow_if: 'request.model == "gpt-4o"'}]
              big:
                rules: [{name: small, deny_if: 'size(args.text) > 10'}]
              free: {}
              secret:
                rules: [{name: user, deny_if: 'args.user == "root"'}]
            """
        )
    )
    digest = {"truncated": "over 65536 bytes", "bytes": 70000, "sha256": "0" * 64, "preview": "{"}
    records = [
        record(1, "fetch"),  # request.model not recorded
        record(2, "fetch", request={"model": "gpt-4o"}),  # recorded: decidable, allowed
        record(3, "fetch", request={"model": "gpt-3"}),  # recorded: allowed -> blocked
        record(4, "big", arguments=digest),  # digest, and the rule reads args
        record(5, "free", arguments=digest),  # digest, but nothing reads args: decidable
        record(6, "secret", arguments={"user": "ann", "token": "[REDACTED]"}),  # not read
        record(7, "secret", arguments={"user": "[REDACTED]"}),  # read
        record(8, "free", "withheld", action="error"),
        record(9, "free", "blocked", gate="stream", reason="incomplete", message="x"),
        record(10, "free", "blocked", gate="callgate", reason="internal_error", message="x"),
        record(11, "free", "blocked", gate="rate_limit", reason="store_error", message="x"),
        record(12, "free", fail_open=["rate_limit"]),
        # Arguments that never parsed replay as the text they were: still invalid.
        record(
            13,
            "free",
            "blocked",
            gate="rules",
            reason="invalid_arguments",
            message="Invalid arguments: not valid JSON (unexpected end)",
            arguments='{"a": ',
        ),
    ]
    report = replay(policy, [write_audit(tmp_path, records)])
    got = report.as_json()
    assert got["total"] == 13
    assert got["undecidable_by_reason"] == {
        "request_facts_not_recorded": 1,
        "digest_arguments": 1,
        "redacted_arguments": 1,
    }
    assert got["not_policy_decisions"] == {
        "withheld": 1,
        "blocked_by_stream": 1,
        "blocked_by_callgate": 1,
        "store_error": 2,
    }
    assert got["other_lines"] == {"resume": 1, "unreadable": 1}
    assert got["allowed_to_blocked"] == 1
    assert got["allowed_to_blocked_examples"][0]["call_id"] == "c3"
    assert got["unchanged"] == 4  # c2, c5, c6, c13
    assert got["blocked_to_allowed"] == 0


def test_recorded_times_drive_the_windows(tmp_path):
    policy = load_policy_text("tools: {t: {rate_limit: {max_calls: 2, window: 10}}}")
    # Two calls, then one 9s later (blocked), then one 10.5s after the first (allowed again).
    records = [record(0, "t"), record(0, "t"), record(9, "t"), record(11, "t")]
    report = replay(policy, [write_audit(tmp_path, records)])
    got = report.as_json()
    assert got["allowed_to_blocked"] == 1
    assert got["allowed_to_blocked_examples"][0]["call_id"] == "c9"
    assert got["unchanged"] == 3


def test_parse_time_matches_datetime():
    for t in (1_750_000_000.123456, 1_700_000_000.0, 1_750_000_059.999999):
        assert abs(parse_time(utc_iso(t)) - t) < 2e-6
    assert parse_time("2026-01-01T00:00:00Z") == 1_767_225_600.0


def test_missing_file_and_subprocess(tmp_path):
    policy = write(tmp_path, "p.yaml", "tools: {}\n")
    assert main(["replay", "--policy", policy, str(tmp_path / "nope.jsonl")]) == 1
    audit = write_audit(tmp_path, [record(1, "x")])
    done = subprocess.run(
        [*proxy_cli(), "replay", "--policy", policy, audit, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unchanged"] == 1


async def test_request_facts_are_recorded_and_replayed(make_proxy, upstream, tmp_path, capsys):
    """Rules may read `request.*`: the records carry model, user and (redacted) metadata, so a
    policy that reads them replays faithfully instead of reporting every call undecidable."""
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        {
            "on_block": "strip",
            "audit": {"log": False, "file": str(path), "redact": ["token"]},
            "tools": {"t": {"rules": [{"name": "no_mini", "deny_if": 'request.model == "mini"'}]}},
        }
    )
    client = proxy.client()
    for i, model in enumerate(("mini", "big", "mini")):
        upstream.push(completion(("t", {}), ids=[f"c{i}"]))
        await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            metadata={"token": "s3cret", "team": "a"},
        )
    await proxy.state.auditor.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["request"]["model"] for r in records] == ["mini", "big", "mini"]
    assert all(r["request"]["metadata"] == {"token": "[REDACTED]", "team": "a"} for r in records)
    looser = write(tmp_path, "looser.yaml", "tools: {t: {}}\n")
    args = ["replay", "--policy", looser, str(path), "--json"]
    capsys.readouterr()  # the proxy's request log lines so far
    assert await asyncio.to_thread(main, args) == 0  # main() runs its own event loop
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["blocked_to_allowed"] == 2 and got["unchanged"] == 1
    assert got["undecidable"] == 0
