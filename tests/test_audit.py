"""Audit: one record per decision, redaction, and the hash-chained file `callgate audit verify`."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import structlog

from proxy.audit import GENESIS, Auditor, redact, seal, verify_file
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
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 3)
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    rec.pop("hash")
    rec["arguments"] = {"i": 99}
    _, forged = seal(rec["prev"], orjson.dumps(rec))
    path.write_bytes(forged + "".join(line + "\n" for line in lines[1:]).encode())
    assert verify_file(str(path)) == (
        1,
        "line 2: chain broken (record removed or reordered before it)",
    )
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: chain broken" in capsys.readouterr().out


async def test_line_format_hash_covers_the_line_bytes(tmp_path):
    """The documented scheme: hash = sha256(prev + the line without its `hash` member)."""
    path = tmp_path / "audit.jsonl"
    await record_some(path, 3)
    prev = GENESIS
    for line in path.read_bytes().splitlines():
        found = re.fullmatch(rb'(\{.*),"hash":"([0-9a-f]{64})"\}', line)
        assert found, line
        body = found[1] + b"}"
        assert orjson.loads(body)["prev"] == prev
        assert list(orjson.loads(body))[-1] == "prev"
        assert found[2].decode() == hashlib.sha256(prev.encode() + body).hexdigest()
        assert orjson.loads(line)["hash"] == found[2].decode()
        prev = found[2].decode()


async def test_verify_detects_edited_bytes(make_proxy, upstream, tmp_path):
    """Any change to a line's bytes is caught, even one that leaves the JSON's meaning intact."""
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 4)
    original = path.read_bytes().splitlines(keepends=True)
    assert b'"arguments":{"i":2}' in original[2]
    edits = [
        original[2].replace(b'"arguments":{"i":2}', b'"arguments":{"i":7}'),  # a value
        original[2].replace(b'"arguments":{"i":2}', b'"arguments":{"i": 2}'),  # whitespace
        original[2].replace(b'"decision":"allowed"', b'"decision":"blocked"'),
        original[2].replace(b'"hash":"', b'"gate":null,"hash":"'),  # a duplicate member
        original[2][:-67] + original[3][-67:],  # another line's hash
    ]
    for edited in edits:
        assert edited != original[2]
        path.write_bytes(b"".join([*original[:2], edited, *original[3:]]))
        assert verify_file(str(path)) == (2, "line 3: hash mismatch (record edited)"), edited
    path.write_bytes(b"".join(original))
    assert verify_file(str(path)) == (4, None)
    path.write_bytes(b"".join(line.replace(b"\n", b"\r\n") for line in original))
    assert verify_file(str(path)) == (4, None)  # line breaks are not part of the record


async def test_record_time_is_datetime_isoformat(tmp_path):
    """Records carry `datetime.now(UTC).isoformat(timespec="microseconds")`, formatted cheaply."""
    from proxy.timestamps import utc_iso

    for now in (0.0, 1_795_603_290.5, 1_795_603_290.015625, 1_795_603_291.0, 951_825_600.25):
        assert utc_iso(now) == datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
    assert utc_iso(1_795_603_290.5) == "2026-11-25T10:41:30.500000+00:00"
    path = tmp_path / "audit.jsonl"
    before = datetime.now(UTC).replace(microsecond=0)
    await record_some(path, 3)
    after = datetime.now(UTC)
    for rec in read_records(path):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", rec["time"])
        assert before <= datetime.fromisoformat(rec["time"]) <= after


def test_redact_nested_and_untouched_when_nothing_matches():
    keys = frozenset({"password", "token"})
    clean = {"a": 1, "b": [{"c": "x"}, ["y", {"d": None}]], "e": {"f": {"g": [1, 2]}}}
    assert redact(clean, keys) is clean
    assert redact(["password", {"x": "token"}], keys) == ["password", {"x": "token"}]
    assert redact("password", keys) == "password"
    deep = {"a": [{"b": {"token": {"password": 1}}}], "password": [1], "c": [[{"token": "t"}]]}
    assert redact(deep, keys) == {
        "a": [{"b": {"token": "[REDACTED]"}}],
        "password": "[REDACTED]",
        "c": [[{"token": "[REDACTED]"}]],
    }
    assert deep["password"] == [1]  # the original is not modified
    assert redact(deep, frozenset()) is deep
    flat = {"q": "x", "n": 1, "f": 1.5, "t": True, "z": None}
    assert redact(flat, keys) is flat
    assert redact({**flat, "token": "t"}, keys) == {**flat, "token": "[REDACTED]"}

    class Args(dict):  # not a plain JSON value: looked into all the same
        pass

    assert redact({"a": Args(token="t")}, keys) == {"a": {"token": "[REDACTED]"}}


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


async def record_some(path: Path, n: int, start: int = 0) -> None:
    """One Auditor's life: start (resuming the file's chain), record n decisions, close."""
    from proxy.gates.decision import Decision
    from proxy.toolcalls import CallContext, ToolCall

    ctx = CallContext(principal="p", request_id="r", route="test")
    auditor = Auditor(AuditConfig(log=False, file=str(path)))
    await auditor.start()
    for i in range(start, start + n):
        call = ToolCall(f"c{i}", "t", json.dumps({"i": i}))
        auditor.record(Decision(call, "t", "strip", args={"i": i}), ctx, "allowed", None)
    await auditor.close()


async def test_chain_resumes_across_auditor_restarts(tmp_path):
    path = tmp_path / "audit.jsonl"
    for start, n in ((0, 2), (2, 1), (3, 2)):  # three processes append to one file
        await record_some(path, n, start)
        assert verify_file(str(path)) == (start + n, None)
    recs = read_records(path)
    assert [r["call_id"] for r in recs] == ["c0", "c1", "c2", "c3", "c4"]
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(recs))


async def test_lines_hashed_the_old_way_still_verify(tmp_path):
    """A file begun before lines were hashed by their bytes (sorted-keys JSON of the record)
    verifies, and records appended after the upgrade chain on from its last line."""
    path = tmp_path / "audit.jsonl"
    await record_some(path, 2)
    prev, lines = GENESIS, []
    for rec in read_records(path):  # rewritten as the previous version wrote them
        rec.pop("hash")
        rec["prev"] = prev
        canonical = orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)
        rec["hash"] = prev = hashlib.sha256(prev.encode() + canonical).hexdigest()
        lines.append(orjson.dumps(rec) + b"\n")
    path.write_bytes(b"".join(lines))
    assert verify_file(str(path)) == (2, None)
    await record_some(path, 2, 2)
    assert verify_file(str(path)) == (4, None)
    assert read_records(path)[2]["prev"] == prev
    edited = lines[1].replace(b'"i":1', b'"i":5')
    path.write_bytes(lines[0] + edited)
    assert verify_file(str(path)) == (1, "line 2: hash mismatch (record edited)")


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


async def test_torn_last_line_is_cut_and_the_chain_resumed(make_proxy, upstream, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_audit(path, make_proxy, upstream, 2)
    torn = b'{"time": "2030-01-01T00:0'  # a crash mid-write
    with path.open("ab") as fh:
        fh.write(torn)
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 0  # a torn tail is no tampering
    assert "torn write" in capsys.readouterr().out
    with structlog.testing.capture_logs() as entries:
        await write_audit(path, make_proxy, upstream, 1)
    assert any(e["event"] == "audit_torn_tail_cut" for e in entries)
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    resume = json.loads(lines[2])["resume"]
    assert resume["cut_bytes"] == len(torn)
    assert resume["cut_sha256"] == hashlib.sha256(torn).hexdigest()
    assert (tmp_path / resume["kept_in"]).read_bytes() == torn  # kept aside, not lost
    assert json.loads(lines[3])["call_id"] == "c0"
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK, 4 records, chain intact, 1 resumption(s)" in out
    assert f"after cutting {len(torn)} bytes" in out


async def test_unparseable_arguments_naming_a_redacted_key_are_not_recorded(
    make_proxy, upstream, tmp_path
):
    path = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        {**audit_config(path, redact=["password"]), "on_block": "strip", "tools": {}}
    )
    upstream.push(completion(("login", '{"password": "hunter2"'), ("echo", '{"text": "not json')))
    await proxy.client().chat.completions.create(model="m", messages=MSGS)
    await proxy.state.auditor.close()
    assert "hunter2" not in path.read_text()
    recs = {r["tool"]: r for r in read_records(path)}
    assert recs["login"]["reason"] == "invalid_arguments"
    assert recs["login"]["arguments"] == "[REDACTED]"
    # Text that names no redacted key stays, to show what the model sent.
    assert recs["echo"]["arguments"] == '{"text": "not json'


async def test_batches_reach_the_file_while_running(tmp_path):
    """Records are written in the background, batch after batch, in order and chained, without
    waiting for close(); and close() writes what a never-started auditor recorded."""
    from proxy.audit import BATCH_SECONDS
    from proxy.gates.decision import Decision
    from proxy.toolcalls import CallContext, ToolCall

    path = tmp_path / "audit.jsonl"
    ctx = CallContext(principal="p", request_id="r", route="test")
    auditor = Auditor(AuditConfig(log=False, file=str(path)))
    await auditor.start()
    for batch in range(3):
        for i in range(batch * 4, batch * 4 + 4):
            auditor.record(
                Decision(ToolCall(f"c{i}", "t", "{}"), "t", "strip"), ctx, "allowed", None
            )
        for _ in range(200):
            await asyncio.sleep(BATCH_SECONDS)
            if path.exists() and len(read_records(path)) == batch * 4 + 4:
                break
        assert [r["call_id"] for r in read_records(path)] == [f"c{i}" for i in range(batch * 4 + 4)]
        assert verify_file(str(path)) == (batch * 4 + 4, None)
    await auditor.close()

    idle = Auditor(AuditConfig(log=False, file=str(path)))  # never started
    idle.record(Decision(ToolCall("c12", "t", "{}"), "t", "strip"), ctx, "allowed", None)
    await idle.close()
    assert read_records(path)[-1]["call_id"] == "c12"
    assert verify_file(str(path)) == (13, None)
