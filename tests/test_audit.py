"""Audit: one record per decision, redaction, and the hash-chained file `callgate audit verify`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog

from proxy.audit import GENESIS, Auditor, verify_file
from proxy.cli import main
from proxy.config import AuditConfig
from tests.conftest import completion

MSGS = [{"role": "user", "content": "hi"}]


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audit_config(path: Path, **extra: Any) -> dict[str, Any]:
    return {"audit": {"log": False, "file": str(path), **extra}}


async def run_mixed_traffic(proxy: Any, upstream: Any) -> None:
    """Allowed, blocked, reprompted, stashed and withheld calls, across several requests."""
    client = proxy.client()
    upstream.push(completion(("ok", {"n": 1}), ids=["c_ok_1"]))
    await client.chat.completions.create(model="m", messages=MSGS)
    # Partial block: one allowed, one dropped and stashed.
    upstream.push(completion(("ok", {"n": 2}), ("bad", {"n": 3}), ids=["c_ok_2", "c_bad_3"]))
    await client.chat.completions.create(model="m", messages=MSGS)
    # All blocked: reprompt, then the model picks an allowed tool.
    upstream.push(
        completion(("bad", {"n": 4}), ids=["c_bad_4"]),
        completion(("ok", {"n": 5}), ids=["c_ok_5"]),
    )
    await client.chat.completions.create(model="m", messages=MSGS)
    # Error mode on one tool: the other call of the response is withheld.
    upstream.push(completion(("ok", {"n": 6}), ("fatal", {"n": 7}), ids=["c_ok_6", "c_fatal_7"]))
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="m", messages=MSGS)
    # A response without tool calls records nothing.
    upstream.push(completion(content="just text"))
    await client.chat.completions.create(model="m", messages=MSGS)


MIXED_POLICY = {
    "tools": {
        "bad": {"allow": False},
        "fatal": {"allow": False, "on_block": "error"},
    }
}
EXPECTED = [
    ("c_ok_1", "ok", "allowed", None, None),
    ("c_ok_2", "ok", "allowed", None, None),
    ("c_bad_3", "bad", "blocked", "rules", "drop+stash"),
    ("c_bad_4", "bad", "blocked", "rules", "reprompt"),
    ("c_ok_5", "ok", "allowed", None, None),
    ("c_ok_6", "ok", "withheld", None, "error"),
    ("c_fatal_7", "fatal", "blocked", "rules", "error"),
]


async def test_every_decision_recorded_exactly_once(make_proxy, upstream, tmp_path):
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy({**MIXED_POLICY, **audit_config(path)})
    heard: list[dict[str, Any]] = []
    proxy.state.auditor.listeners.append(heard.append)
    await run_mixed_traffic(proxy, upstream)
    await proxy.state.auditor.close()
    recs = read_records(path)
    got = [(r["call_id"], r["tool"], r["decision"], r["gate"], r["action"]) for r in recs]
    assert got == EXPECTED
    assert len(heard) == len(EXPECTED) == proxy.state.auditor.records
    assert [r["call_id"] for r in heard] == [r["call_id"] for r in recs]
    # Each record carries the fields an auditor needs.
    for rec in recs:
        assert rec["request_id"].startswith("cg-")
        assert rec["principal"].startswith("key:")
        assert rec["route"] == "chat.completions"
        assert rec["arguments"]["n"] == int(rec["call_id"].rsplit("_", 1)[1])
        assert isinstance(rec["latency_ms"], float | int) and rec["latency_ms"] >= 0
        assert rec["time"].endswith("+00:00")
    blocked = next(r for r in recs if r["call_id"] == "c_bad_3")
    assert blocked["reason"] == "tool_not_allowed"
    assert blocked["message"] == "Policy violation: tool 'bad' is not allowed"
    # Requests are told apart; the reprompt's two rounds share one request id.
    by_call = {r["call_id"]: r["request_id"] for r in recs}
    assert by_call["c_bad_4"] == by_call["c_ok_5"]
    assert len(set(by_call.values())) == 4
    assert main(["audit", "verify", str(path)]) == 0


async def test_audit_log_lines_once_per_decision(make_proxy, upstream):
    proxy = await make_proxy({**MIXED_POLICY, "audit": {"log": True}})
    with structlog.testing.capture_logs() as entries:
        await run_mixed_traffic(proxy, upstream)
    lines = [e for e in entries if e["event"] == "tool_call_decision"]
    assert [(e["call_id"], e["decision"]) for e in lines] == [(c, d) for c, _, d, _, _ in EXPECTED]
    assert all(e["log_level"] == "info" for e in lines)


async def test_audit_log_off_writes_no_log_lines(make_proxy, upstream):
    proxy = await make_proxy({"audit": {"log": False}})
    with structlog.testing.capture_logs() as entries:
        upstream.push(completion(("ok", {})))
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    assert proxy.state.auditor.records == 1
    assert not [e for e in entries if e["event"] == "tool_call_decision"]


async def test_redaction_of_configured_keys(make_proxy, upstream, tmp_path):
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        {
            **audit_config(path, log=True, redact=["password", "api_key"]),
            "on_block": "strip",
            "tools": {"login": {"allow": False}},
        }
    )
    args = {
        "user": "bob",
        "password": "hunter2",
        "nested": {"api_key": "sk-nested-secret", "keep": "visible"},
        "items": [{"password": "in-a-list"}, "plain"],
    }
    with structlog.testing.capture_logs() as entries:
        upstream.push(completion(("login", args), ("other", {"api_key": "sk-other"})))
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    await proxy.state.auditor.close()
    text = path.read_text()
    for secret in ("hunter2", "sk-nested-secret", "in-a-list", "sk-other"):
        assert secret not in text
        assert secret not in repr(entries)
    recs = {r["tool"]: r for r in read_records(path)}
    assert recs["login"]["arguments"] == {
        "user": "bob",
        "password": "[REDACTED]",
        "nested": {"api_key": "[REDACTED]", "keep": "visible"},
        "items": [{"password": "[REDACTED]"}, "plain"],
    }
    assert recs["other"]["arguments"] == {"api_key": "[REDACTED]"}
    logged = {e["tool"]: e for e in entries if e["event"] == "tool_call_decision"}
    assert logged["login"]["arguments"]["password"] == "[REDACTED]"
    assert logged["login"]["arguments"]["nested"]["api_key"] == "[REDACTED]"
    assert main(["audit", "verify", str(path)]) == 0


async def test_invalid_json_arguments_recorded_as_text(make_proxy, upstream, tmp_path):
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy({**audit_config(path), "on_block": "strip"})
    upstream.push(completion(("t", '{"password": "oops'), ids=["c1"]))
    await proxy.client().chat.completions.create(model="m", messages=MSGS)
    await proxy.state.auditor.close()
    (rec,) = read_records(path)
    assert rec["decision"] == "blocked" and rec["reason"] == "invalid_arguments"
    assert rec["arguments"] == '{"password": "oops'


async def write_audit(path: Path, make_proxy: Any, upstream: Any, n: int) -> None:
    proxy = await make_proxy(audit_config(path))
    for i in range(n):
        upstream.push(completion(("t", {"i": i}), ids=[f"c{i}"]))
        await proxy.client().chat.completions.create(model="m", messages=MSGS)
    await proxy.state.auditor.close()


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


async def test_verify_intact_then_edited_record(make_proxy, upstream, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 4)
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 0
    assert "OK, 4 records, chain intact" in capsys.readouterr().out
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    assert rec["decision"] == "allowed"
    rec["decision"] = "blocked"  # edited, the stored hash kept
    rewrite(path, [*lines[:2], json.dumps(rec), *lines[3:]])
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "line 3: hash mismatch" in out
    assert "2 records verified before it" in out


async def test_verify_edit_with_recomputed_hash_is_caught(make_proxy, upstream, tmp_path, capsys):
    """Re-hashing an edited record does not help: the next record's `prev` no longer matches."""
    from proxy.audit import chain_hash

    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 3)
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    rec.pop("hash")
    rec["arguments"] = {"i": 99}
    rec["hash"] = chain_hash(rec["prev"], rec)
    rewrite(path, [json.dumps(rec), *lines[1:]])
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: chain broken" in capsys.readouterr().out


async def test_verify_detects_deleted_line(make_proxy, upstream, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 4)
    lines = path.read_text().splitlines()
    rewrite(path, [lines[0], *lines[2:]])
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: chain broken" in capsys.readouterr().out
    rewrite(path, lines[1:])  # the first record removed
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 1: chain broken" in capsys.readouterr().out


async def test_verify_detects_reordering(make_proxy, upstream, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 4)
    lines = path.read_text().splitlines()
    rewrite(path, [lines[0], lines[2], lines[1], lines[3]])
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: chain broken" in capsys.readouterr().out


async def test_verify_rejects_garbage_and_missing_file(tmp_path, capsys, make_proxy, upstream):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 2)
    lines = path.read_text().splitlines()
    rewrite(path, [lines[0], "{not json", lines[1]])
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: not an audit record" in capsys.readouterr().out
    rewrite(path, [lines[0], "[1, 2]"])
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: not an audit record" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 1
    assert "No such file" in capsys.readouterr().err


async def test_chain_continues_across_restart(make_proxy, upstream, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 2)
    last_hash = read_records(path)[-1]["hash"]
    # A second process (a new proxy, a new Auditor) appends to the same file.
    await write_audit(path, make_proxy, upstream, 3)
    recs = read_records(path)
    assert len(recs) == 5
    assert recs[0]["prev"] == GENESIS
    assert recs[2]["prev"] == last_hash
    assert verify_file(str(path)) == (5, None)
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 0
    assert "OK, 5 records" in capsys.readouterr().out


async def test_auditor_restart_after_long_last_record(tmp_path):
    """The chain resumes even when the last record is longer than the tail read at start-up."""
    from proxy.gates.decision import Decision
    from proxy.toolcalls import CallContext, ToolCall

    path = tmp_path / "audit.jsonl"
    ctx = CallContext(principal="p", request_id="r", route="test")
    for size in (10, 200_000):
        auditor = Auditor(AuditConfig(log=False, file=str(path)))
        await auditor.start()
        args = json.dumps({"blob": "x" * size})
        auditor.record(Decision(ToolCall("c", "t", args), "t", "strip"), ctx, "allowed", None)
        await auditor.close()
    auditor = Auditor(AuditConfig(log=False, file=str(path)))
    await auditor.start()
    auditor.record(Decision(ToolCall("c2", "t", "{}"), "t", "strip"), ctx, "allowed", None)
    await auditor.close()
    assert verify_file(str(path)) == (3, None)


async def test_records_kept_when_file_cannot_be_written(tmp_path):
    """A failing write is logged and retried; no record is lost and close() does not raise."""
    from proxy.gates.decision import Decision
    from proxy.toolcalls import CallContext, ToolCall

    path = tmp_path / "missing-dir" / "audit.jsonl"
    ctx = CallContext(principal="p", request_id="r", route="test")
    auditor = Auditor(AuditConfig(log=False, file=str(path)))
    await auditor.start()
    with structlog.testing.capture_logs() as entries:
        auditor.record(Decision(ToolCall("c1", "t", "{}"), "t", "strip"), ctx, "allowed", None)
        for _ in range(200):  # the background writer tries, fails, and says so
            if any(e["event"] == "audit_write_failed" for e in entries):
                break
            await asyncio.sleep(0.01)
    assert any(e["event"] == "audit_write_failed" for e in entries)
    assert not path.exists()
    path.parent.mkdir()
    auditor.record(Decision(ToolCall("c2", "t", "{}"), "t", "strip"), ctx, "allowed", None)
    await auditor.close()
    assert [r["call_id"] for r in read_records(path)] == ["c1", "c2"]
    assert verify_file(str(path)) == (2, None)


async def test_torn_last_line_does_not_stop_the_auditor(make_proxy, upstream, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 2)
    with path.open("ab") as fh:
        fh.write(b'{"time": "2030-01-01T00:0')  # a crash mid-write
    with structlog.testing.capture_logs() as entries:
        await write_audit(path, make_proxy, upstream, 1)
    assert any(e["event"] == "audit_file_damaged" for e in entries)
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert json.loads(lines[3])["call_id"] == "c0"  # the new record has a line of its own
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 3: not an audit record" in capsys.readouterr().out
