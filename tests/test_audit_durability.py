"""The audit file's durability: records written before delivery (group commit), fail closed when
they cannot be, `audit.fsync`, records that cannot be serialized, torn-tail recovery, and a
process killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import audit
from proxy.audit import (
    GENESIS,
    PREVIEW_CHARS,
    Auditor,
    AuditUnavailable,
    redact,
    verify_chain,
    verify_file,
)
from proxy.cli import main
from proxy.config import AuditConfig
from proxy.gates.decision import Decision
from proxy.toolcalls import CallContext, ToolCall

ROOT = Path(__file__).resolve().parent.parent
CTX = CallContext(principal="p", request_id="r", route="test")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def call_ids(path: Path) -> list[str]:
    return [r["call_id"] for r in read_records(path) if "call_id" in r]


async def started(path: Path, **settings: Any) -> Auditor:
    auditor = Auditor(AuditConfig(log=False, file=str(path), **settings))
    await auditor.start()
    return auditor


def record(
    auditor: Auditor,
    call_id: str,
    args: Any = None,
    text: str | None = None,
    ctx: CallContext = CTX,
    tool: str = "t",
) -> None:
    if args is None:
        args = {"id": call_id}
    call = ToolCall(call_id, tool, text if text is not None else json.dumps({"id": call_id}))
    auditor.record(Decision(call, "t", "strip", args=args), ctx, "allowed", None)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# --- group commit ---------------------------------------------------------------------------


async def test_concurrent_waiters_share_writes_and_find_their_record_written(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    assert auditor.needs_wait
    seen_missing: list[str] = []

    async def request(i: int) -> None:
        await asyncio.sleep(random.random() * 0.01)  # spread over a few loop iterations
        record(auditor, f"c{i}")
        await auditor.durable()
        # Right when durable() returns, the record is in the file (another process could read it).
        if f"c{i}" not in call_ids(path):
            seen_missing.append(f"c{i}")

    await asyncio.gather(*(request(i) for i in range(300)))
    assert seen_missing == []
    assert auditor._writer is not None
    writes = auditor._writer.writes
    assert 1 <= writes <= 60, writes  # shared: far fewer writes than the 300 waiters
    await auditor.close()
    assert sorted(call_ids(path)) == sorted(f"c{i}" for i in range(300))
    assert verify_file(str(path)) == (300, None)


async def test_one_iteration_of_waiters_is_one_write(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        if b'"call_id"' in bytes(data):
            writes.append(len(data))
        return real_write(fd, data)

    async def request(i: int) -> None:
        record(auditor, f"c{i}")
        await auditor.durable()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", counting_write)
        await asyncio.gather(*(request(i) for i in range(100)))  # all record in one iteration
    assert len(writes) == 1
    await auditor.close()
    assert verify_file(str(path)) == (100, None)


async def test_durable_is_immediate_without_a_file_and_when_nothing_is_pending(tmp_path):
    auditor = Auditor(AuditConfig(log=False))
    await auditor.start()
    assert not auditor.needs_wait
    record(auditor, "c0")
    await asyncio.wait_for(auditor.durable(), 0.001)

    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    await asyncio.wait_for(auditor.durable(), 0.001)  # nothing recorded: nothing to wait for
    record(auditor, "c1")
    await auditor.durable()
    assert call_ids(path) == ["c1"]
    await asyncio.wait_for(auditor.durable(), 0.001)  # already written
    await auditor.close()


async def test_a_waiter_on_a_batch_the_timer_sealed_waits_for_its_write(tmp_path, sync_spy):
    """Records nobody awaited go out with the 20 ms batch; a waiter who comes after the batch
    was sealed (while the writer thread's write is under way) still returns only once it is
    written. (`fsync: batch` writes from a thread; `never` writes on the loop, where a batch is
    never sealed without being written.)"""
    path = tmp_path / "audit.jsonl"
    auditor = await started(path, fsync="batch")
    release = threading.Event()
    real_write = os.write

    def slow_write(fd: int, data: Any) -> int:
        if b'"call_id"' in bytes(data):
            release.wait(5)
        return real_write(fd, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", slow_write)
        record(auditor, "c0")
        await asyncio.sleep(audit.BATCH_SECONDS * 3)  # sealed by the timer, write held
        waiter = asyncio.ensure_future(auditor.durable())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert not path.exists() or call_ids(path) == []
        release.set()
        await asyncio.wait_for(waiter, 5)
    assert call_ids(path) == ["c0"]
    await auditor.close()


async def test_a_cancelled_waiter_does_not_cancel_the_others(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    record(auditor, "c0")
    first = asyncio.ensure_future(auditor.durable())
    second = asyncio.ensure_future(auditor.durable())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 5)
    assert call_ids(path) == ["c0"]
    await auditor.close()


# --- fail closed ------------------------------------------------------------------------------


async def test_durable_raises_when_the_file_cannot_be_written_then_recovers(tmp_path):
    path = tmp_path / "missing-dir" / "audit.jsonl"
    auditor = await started(path)
    record(auditor, "c0")
    with pytest.raises(AuditUnavailable, match="No such file"):
        await asyncio.wait_for(auditor.durable(), 5)
    record(auditor, "c1")  # each waiter's answer comes from a write attempt of its own
    with pytest.raises(AuditUnavailable):
        await asyncio.wait_for(auditor.durable(), 5)
    path.parent.mkdir()
    record(auditor, "c2")
    await asyncio.wait_for(auditor.durable(), 5)  # the retry carries the earlier records too
    assert call_ids(path) == ["c0", "c1", "c2"]
    await auditor.close()
    assert verify_file(str(path)) == (3, None)


async def test_disk_full_mid_write_fails_the_waiters_and_repeats_no_bytes(tmp_path):
    """ENOSPC after part of a batch went out: the waiters are told, and the retry writes only
    the rest (the file has every line once and verifies)."""
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    real_write = os.write
    full = True
    short_writes: list[int] = []

    def filling_write(fd: int, data: Any) -> int:
        if full and fd == getattr(auditor._writer, "_fd", None):
            if not short_writes:  # a short write, then the disk is full
                short_writes.append(len(data))
                return real_write(fd, bytes(data)[:40])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", filling_write)
        for i in range(3):
            record(auditor, f"c{i}")
        with pytest.raises(AuditUnavailable, match="No space left"):
            await asyncio.wait_for(auditor.durable(), 5)
        full = False
        record(auditor, "c3")
        await asyncio.wait_for(auditor.durable(), 5)
    await auditor.close()
    assert short_writes
    assert call_ids(path) == ["c0", "c1", "c2", "c3"]
    assert verify_file(str(path)) == (4, None)


async def test_fsync_never_writes_on_the_loop_in_one_write_per_batch(tmp_path):
    """`fsync: never` needs no thread: the batch is written (one write) before the waiters
    resume, and no writer thread is started."""
    path = tmp_path / "audit.jsonl"
    before = set(threading.enumerate())  # (other tests' writers may still be winding down)
    auditor = await started(path)
    for i in range(5):
        record(auditor, f"c{i}")
    await asyncio.wait_for(auditor.durable(), 5)
    assert call_ids(path) == [f"c{i}" for i in range(5)]
    assert auditor._writer is not None and auditor._writer.writes == 1
    started_threads = set(threading.enumerate()) - before
    assert not any(t.name.startswith("callgate-audit") for t in started_threads)
    await auditor.close()
    assert verify_file(str(path)) == (5, None)


async def test_fsync_never_retries_a_failed_write_on_its_own(tmp_path, monkeypatch):
    """Written on the loop, a failed batch is tried again after RETRY_SECONDS even when no
    other record comes to carry it, and the waiter of a later batch finds both written."""
    monkeypatch.setattr(audit.writer, "RETRY_SECONDS", 0.05)
    path = tmp_path / "later" / "audit.jsonl"  # the directory does not exist yet
    auditor = await started(path)
    record(auditor, "c0")
    with pytest.raises(AuditUnavailable):
        await asyncio.wait_for(auditor.durable(), 5)
    path.parent.mkdir()
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # the retry timer, with nothing new recorded
    assert call_ids(path) == ["c0"]
    record(auditor, "c1")
    await asyncio.wait_for(auditor.durable(), 5)
    assert call_ids(path) == ["c0", "c1"]
    await auditor.close()
    assert verify_file(str(path)) == (2, None)


async def test_durable_after_close_with_records_lost_raises(tmp_path):
    path = tmp_path / "missing-dir" / "audit.jsonl"
    auditor = await started(path)
    record(auditor, "c0")
    waiter = asyncio.ensure_future(auditor.durable())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit.writer, "RETRY_SECONDS", 0.01)  # read by the writer thread
        await auditor.close()
    with pytest.raises(AuditUnavailable):
        await waiter
    with pytest.raises(AuditUnavailable):
        await auditor.durable()


# --- fsync ------------------------------------------------------------------------------------


class SyncSpy:
    """os.fdatasync stand-in: counts calls, can be held, records when each finished."""

    def __init__(self) -> None:
        self.calls = 0
        self.done_at: list[float] = []
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.hold.wait(5)
        if self.fail:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.done_at.append(time.monotonic())


@pytest.fixture
def sync_spy(monkeypatch: pytest.MonkeyPatch) -> SyncSpy:
    spy = SyncSpy()
    monkeypatch.setattr(os, "fdatasync", spy)
    return spy


async def test_fsync_never_syncs_nothing(tmp_path, sync_spy):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    for i in range(3):
        record(auditor, f"c{i}")
        await auditor.durable()
    await auditor.close()
    assert sync_spy.calls == 0
    assert call_ids(path) == ["c0", "c1", "c2"]


async def test_fsync_always_syncs_before_the_waiters_go_on(tmp_path, sync_spy):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path, fsync="always")
    sync_spy.hold.clear()
    record(auditor, "c0")
    waiter = asyncio.ensure_future(auditor.durable())
    await asyncio.sleep(0.1)
    assert call_ids(path) == ["c0"]  # written, but not yet synced: the waiter still waits
    assert not waiter.done()
    sync_spy.hold.set()
    await asyncio.wait_for(waiter, 5)
    assert sync_spy.calls == 1 and sync_spy.done_at[0] <= time.monotonic()

    async def request(i: int) -> None:
        record(auditor, f"d{i}")
        await auditor.durable()

    await asyncio.gather(*(request(i) for i in range(50)))
    assert 2 <= sync_spy.calls <= 4  # one sync per shared write, not per record
    await auditor.close()
    assert verify_file(str(path)) == (51, None)


async def test_fsync_batch_syncs_each_write_without_holding_the_waiters(tmp_path, sync_spy):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path, fsync="batch")
    sync_spy.hold.clear()  # the sync never finishes while we wait: durable() must not need it
    record(auditor, "c0")
    await asyncio.wait_for(auditor.durable(), 2)
    assert call_ids(path) == ["c0"]
    for _ in range(100):
        if sync_spy.calls:
            break
        await asyncio.sleep(0.01)
    assert sync_spy.calls == 1  # under way right after the write
    sync_spy.hold.set()
    record(auditor, "c1")
    await auditor.durable()
    for _ in range(200):  # the write of c1 is followed by a sync of its own
        if sync_spy.calls >= 2:
            break
        await asyncio.sleep(0.01)
    synced = sync_spy.calls
    assert synced >= 2
    await auditor.close()
    assert sync_spy.calls == synced + 1  # close() leaves the file synced


async def test_fsync_always_failure_fails_the_waiters(tmp_path, sync_spy):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path, fsync="always")
    sync_spy.fail = True
    record(auditor, "c0")
    with pytest.raises(AuditUnavailable, match="fdatasync"):
        await asyncio.wait_for(auditor.durable(), 5)
    sync_spy.fail = False
    record(auditor, "c1")
    await asyncio.wait_for(auditor.durable(), 5)
    await auditor.close()
    assert call_ids(path) == ["c0", "c1"]  # written once each (a failed sync is not a rewrite)
    assert verify_file(str(path)) == (2, None)


# --- records that cannot be serialized, or not whole -------------------------------------------


async def test_unserializable_records_are_written_safely_and_alone(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    bad: dict[str, Any] = {
        "deep300": nested(300),
        "deep5000": nested(5000),
        "bigint": {"n": 2**70},
        "hugeint": {"n": 10**5000},
        "keys": {1: "one", (2, 3): "pair"},
        "surrogate": {"s": "\ud800"},
        "object": {"o": object()},
    }
    expected: list[str] = []
    for i, (name, args) in enumerate(bad.items()):
        record(auditor, f"ok{i}")
        record(auditor, name, args, text=f"raw text of {name}")
        expected += [f"ok{i}", name]
    record(auditor, "nan", {"x": float("nan"), "y": float("inf")})  # orjson writes null
    ctx = CallContext(principal="bad\udcffprincipal", request_id="r", route="test")
    record(auditor, "badprincipal", ctx=ctx)
    record(auditor, "last")
    await auditor.durable()
    await auditor.close()
    assert call_ids(path) == [*expected, "nan", "badprincipal", "last"]
    assert verify_chain(str(path)).problem is None
    recs = {r["call_id"]: r for r in read_records(path)}
    for i, name in enumerate(bad):
        assert recs[f"ok{i}"]["arguments"] == {"id": f"ok{i}"}  # neighbours untouched
        form = recs[name]["arguments"]
        assert isinstance(form["unserializable"], str), name
        raw = f"raw text of {name}".encode()
        assert form["sha256"] == hashlib.sha256(raw).hexdigest()
        assert form["bytes"] == len(raw)
        assert len(form["preview"]) <= PREVIEW_CHARS
    assert "Recursion" in recs["deep5000"]["arguments"]["unserializable"]
    assert recs["deep5000"]["arguments"]["preview"].startswith('[{"k":[{"k":[')
    assert recs["bigint"]["arguments"]["preview"] == '{"n":1180591620717411303424}'
    assert recs["nan"]["arguments"] == {"x": None, "y": None}
    assert recs["badprincipal"]["principal"] == "bad\\udcffprincipal"
    assert recs["badprincipal"]["unserializable"] == ["principal"]


async def test_oversized_arguments_and_fields_are_bounded(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path, max_argument_bytes=4096)
    text = json.dumps({"blob": "x" * 100_000})
    record(auditor, "big", {"blob": "x" * 100_000}, text=text)
    record(auditor, "small", {"blob": "x" * 100})
    record(auditor, "longname", tool="n" * 50_000)
    await auditor.durable()
    await auditor.close()
    lines = path.read_bytes().splitlines()
    assert all(len(line) < 20_000 for line in lines)
    recs = {r["call_id"]: r for r in read_records(path)}
    form = recs["big"]["arguments"]
    assert form["truncated"] == "over 4096 bytes"
    assert (
        form["bytes"] == len(text) and form["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    )
    assert form["preview"].startswith('{"blob":"xxx') and len(form["preview"]) == PREVIEW_CHARS
    assert recs["small"]["arguments"] == {"blob": "x" * 100}
    assert recs["longname"]["tool"].startswith("n" * 4096 + "...[50000 chars, sha256 ")
    assert verify_file(str(path)) == (3, None)


async def test_redacted_values_never_reach_a_digest_or_preview(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = await started(path, redact=["password"], max_argument_bytes=1024)
    deep = nested(5000, {"password": "hunter2", "n": 2**70})
    record(auditor, "deep", deep, text=json.dumps({"password": "hunter2"}))
    record(auditor, "big", {"password": "hunter2", "pad": "y" * 5000}, text="hunter2 " * 700)
    await auditor.durable()
    await auditor.close()
    assert "hunter2" not in path.read_text()
    recs = {r["call_id"]: r for r in read_records(path)}
    for name in ("deep", "big"):
        form = recs[name]["arguments"]
        assert form["redacted"] is True and "sha256" not in form
    assert verify_file(str(path)) == (2, None)


def test_redact_at_any_depth():
    keys = frozenset({"password"})
    deep = nested(20_000, {"password": "hunter2", "keep": 1})
    out = redact(deep, keys)
    assert "hunter2" not in audit._preview(out, 10**7)
    assert audit._preview(out, 10**7).count('"[REDACTED]"') == 1
    assert '"hunter2"' in audit._preview(deep, 10**7)  # the original is left as it was
    untouched = nested(20_000, {"other": 1})
    assert redact(untouched, keys) is untouched


# --- torn tail --------------------------------------------------------------------------------


async def write_records(path: Path, ids: list[str]) -> None:
    auditor = await started(path)
    for call_id in ids:
        record(auditor, call_id)
    await auditor.durable()
    await auditor.close()


async def test_torn_tail_is_moved_aside_and_the_chain_resumes(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_records(path, ["a", "b", "c"])
    whole = path.read_bytes()
    torn = whole.splitlines(keepends=True)[1][:57]  # half a line: a crash mid-write
    path.write_bytes(whole + torn)
    assert verify_chain(str(path)).torn_tail is not None
    assert main(["audit", "verify", "--strict", str(path)]) == 2  # not yet resumed, but torn

    await write_records(path, ["d", "e"])
    assert path.read_bytes().startswith(whole)  # the records before it are untouched
    assert call_ids(path) == ["a", "b", "c", "d", "e"]
    result = verify_chain(str(path))
    assert result.problem is None and result.records == 6 and len(result.resumptions) == 1
    resume = read_records(path)[3]["resume"]
    assert resume["cut_bytes"] == len(torn) and resume["cut_at"] == len(whole)
    assert resume["cut_sha256"] == hashlib.sha256(torn).hexdigest()
    assert (tmp_path / resume["kept_in"]).read_bytes() == torn
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK, 6 records, chain intact, 1 resumption(s)" in out
    assert f"line 4: resumed at {read_records(path)[3]['time']} after cutting 57 bytes" in out
    assert main(["audit", "verify", "--strict", str(path)]) == 2
    assert "RESUMED" in capsys.readouterr().out

    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"id":"b"', b'"id":"x"')  # tampering is still tampering
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 2: hash mismatch" in capsys.readouterr().out


async def test_several_damaged_lines_and_repeated_crashes(tmp_path):
    path = tmp_path / "audit.jsonl"
    await write_records(path, ["a"])
    with path.open("ab") as fh:
        fh.write(b"\x00" * 4096 + b"\n{garbage\n\n" + b'{"time":')  # e.g. after a power loss
    await write_records(path, ["b"])
    with path.open("ab") as fh:
        fh.write(b'{"ti')
    await write_records(path, ["c"])
    assert call_ids(path) == ["a", "b", "c"]
    result = verify_chain(str(path))
    assert (result.problem, result.records, len(result.resumptions)) == (None, 5, 2)


async def test_torn_tail_kept_in_place_when_it_cannot_be_cut(tmp_path, monkeypatch):
    """An append-only file (chattr +a) cannot be truncated: the damaged bytes stay, on lines of
    their own, and the resume record after them states their digest, which verify checks."""
    path = tmp_path / "audit.jsonl"
    await write_records(path, ["a", "b"])
    torn = b'{"time":"2030-01-01T00:00:00'
    with path.open("ab") as fh:
        fh.write(torn)

    def refuse(*_: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "truncate", refuse)
    await write_records(path, ["c"])
    assert list(tmp_path.glob("*.torn-*")) == []
    assert torn + b"\n" in path.read_bytes()
    result = verify_chain(str(path))
    assert (result.problem, result.records, len(result.resumptions)) == (None, 4, 1)
    assert "in place" in result.resumptions[0]
    path.write_bytes(path.read_bytes().replace(torn, torn.replace(b"2030", b"2031")))
    assert (
        verify_file(str(path))[1] == "line 3: not an audit record (the damaged bytes differ"
        " from those the resume record at line 4 states)"
    )


def test_verify_reads_files_of_older_versions_with_a_restarted_chain(tmp_path):
    """Before resume records, a torn line was followed by a chain restarted from GENESIS."""
    path = tmp_path / "audit.jsonl"
    first = _legacy_lines(2)
    second = _legacy_lines(2)
    path.write_bytes(b"".join(first) + b'{"time": "20\n' + b"".join(second))
    result = verify_chain(str(path))
    assert (result.problem, result.records) == (None, 4)
    assert "chain restarted after 13 damaged bytes at line 3" in result.resumptions[0]
    # A garbage line whose next record does not restart the chain is no crash's doing.
    path.write_bytes(first[0] + b'{"time": "20\n' + first[1])
    assert verify_file(str(path)) == (1, "line 2: not an audit record")


def _legacy_lines(n: int) -> list[bytes]:
    prev, lines = GENESIS, []
    for i in range(n):
        body = orjson.dumps({"call_id": f"l{i}", "prev": prev})
        prev, line = audit.seal(prev, body)
        lines.append(line)
    return lines


# --- killed with SIGKILL ------------------------------------------------------------------------

KILLED_WRITER = """
import asyncio, json, sys
from proxy.audit import Auditor
from proxy.config import AuditConfig
from proxy.gates.decision import Decision
from proxy.toolcalls import CallContext, ToolCall

async def main(path, run):
    auditor = Auditor(AuditConfig(log=False, file=path))
    await auditor.start()
    ctx = CallContext(principal="p", request_id="r", route="kill")
    out = sys.stdout

    async def client(k):
        for i in range(100000):
            call_id = f"{run}-{k}-{i}"
            args = {"id": call_id, "pad": "z" * (i % 7 * 300)}
            call = ToolCall(call_id, "t", json.dumps(args))
            auditor.record(Decision(call, "t", "strip", args=args), ctx, "allowed", None)
            await auditor.durable()
            out.write(call_id + "\\n")  # delivered: only after its record is written
            out.flush()
            await asyncio.sleep(0)

    await asyncio.gather(*(client(k) for k in range(8)))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_sigkill_at_random_moments_loses_no_delivered_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    rng = random.Random(19)
    delivered: list[str] = []
    kills = 5
    for run in range(kills + 1):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(path), f"r{run}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # running: it has delivered a call
        assert first, proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL if run < kills else signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode in (-signal.SIGKILL, -signal.SIGTERM), err
        delivered += (first + rest).decode().split()
        assert len(delivered) > run
    on_record = set(call_ids(path))
    missing = [call_id for call_id in delivered if call_id not in on_record]
    assert missing == [], f"{len(missing)} delivered calls without a record"
    result = verify_chain(str(path))
    assert result.problem is None, result.problem
    assert result.records >= len(delivered)


# --- rotation -----------------------------------------------------------------------------------


async def test_rotated_file_is_followed_and_verifies_with_its_predecessor(
    tmp_path, capsys, monkeypatch
):
    # Checked on every write here; callgate checks at most once a second.
    monkeypatch.setattr(audit.writer, "ROTATION_CHECK_SECONDS", 0.0)
    path = tmp_path / "audit.jsonl"
    rotated = tmp_path / "audit.jsonl.1"
    auditor = await started(path)
    for call_id in ("a", "b"):
        record(auditor, call_id)
    await auditor.durable()
    path.rename(rotated)  # logrotate, without copytruncate
    for call_id in ("c", "d"):
        record(auditor, call_id)
    await auditor.durable()
    await auditor.close()
    assert call_ids(rotated) == ["a", "b"]
    assert call_ids(path) == ["c", "d"]
    capsys.readouterr()
    assert main(["audit", "verify", str(path)]) == 1  # alone, it starts mid-chain
    assert "line 1: chain broken" in capsys.readouterr().out
    assert main(["audit", "verify", str(rotated), str(path)]) == 0
    out = capsys.readouterr().out
    assert "audit.jsonl.1: OK, 2 records" in out and "audit.jsonl: OK, 2 records" in out
    assert main(["audit", "verify", str(path), str(rotated)]) == 1  # out of order


async def test_a_window_lets_waiters_of_later_iterations_share_one_write(tmp_path, monkeypatch):
    """Streams reach their calls at different moments: a waiter with a window lets later
    records share its write, and a waiter without a window is never held by someone else's."""
    monkeypatch.setattr(audit, "BATCH_SECONDS", 5.0)  # only the waiters decide when it flushes
    path = tmp_path / "audit.jsonl"
    auditor = await started(path)
    loop = asyncio.get_running_loop()
    record(auditor, "z")
    await asyncio.wait_for(auditor.durable(), 5)
    record(auditor, "a")
    first = asyncio.ensure_future(auditor.durable(0.2))
    await asyncio.sleep(0.02)  # a later loop iteration, well inside the window
    record(auditor, "b")
    second = asyncio.ensure_future(auditor.durable(0.2))
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert auditor._writer is not None and auditor._writer.writes == 2  # z, then a and b
    assert call_ids(path) == ["z", "a", "b"]

    record(auditor, "c")
    started_at = loop.time()
    await asyncio.wait_for(auditor.durable(0.2), 5)
    assert loop.time() - started_at >= 0.15  # it did wait for company

    record(auditor, "d")
    slow = asyncio.ensure_future(auditor.durable(30.0))
    await asyncio.sleep(0)
    started_at = loop.time()
    await asyncio.wait_for(auditor.durable(), 5)  # no window: flushed now, not in 30 s
    assert loop.time() - started_at < 2
    await asyncio.wait_for(slow, 1)
    assert call_ids(path) == ["z", "a", "b", "c", "d"]
    await auditor.close()
