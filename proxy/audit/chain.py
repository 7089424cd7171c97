"""The audit file's hash chain: sealing a record's line, verifying a file, and cutting a torn
tail on start.

Each file line is one JSON object: the record, then `prev` (the previous line's hash, or 64
zeros for the first), then `hash` as its last member. The hash covers the object's exact bytes:
with `body` = the object without its trailing `,"hash":"<64 hex>"}`, plus a closing `}` (the
object as serialized before `hash` was added), `hash` = sha256(prev + body) in hex. So each
record is serialized once, and editing any byte of a line's object, dropping or reordering
lines breaks the chain at that line (`callgate audit verify FILE`). Lines written before this
scheme (hash over the record's sorted-keys JSON) still verify.

A torn tail (callgate killed, or the machine lost power, mid-write) is moved aside on start
(`FILE.torn-<time>`), the file cut back to its last whole record, and a `resume` record that
states what was cut (bytes, sha256, where it was kept) continues the chain from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson
import structlog

GENESIS = "0" * 64
TORN_SCAN_BYTES = 64 * 1024 * 1024  # how far back start-up looks for the last whole record
log = structlog.get_logger("callgate.audit")


_SEAL = re.compile(rb',"hash":"([0-9a-f]{64})"\}')
_SEAL_LEN = 75  # len(b',"hash":"') + 64 + len(b'"}')


def seal(prev: str, body: bytes) -> tuple[str, bytes]:
    """The hash of a record serialized as `body` (a JSON object with `prev` as its last member),
    and the file line that carries it: `body` with `"hash"` added as the last member."""
    digest = hashlib.sha256(prev.encode() + body).hexdigest()
    return digest, b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))


def _sealed(prev: str, line: bytes, stated: str, record: dict[str, Any]) -> bool:
    """Whether `stated` (the line's parsed hash) is the hash of the line's object's bytes."""
    line = line.strip()  # the line break (and any whitespace around the object) is not hashed
    found = _SEAL.fullmatch(line, len(line) - _SEAL_LEN) if len(line) > _SEAL_LEN else None
    if found and found[1] == stated.encode():
        body = line[:-_SEAL_LEN] + b"}"
        if hashlib.sha256(prev.encode() + body).hexdigest() == stated:
            return True
    # A line written before records were sealed by their bytes: sorted-keys JSON of the record.
    try:
        legacy = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return False
    return hashlib.sha256(prev.encode() + legacy).hexdigest() == stated


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """The line's record, if it is one: a JSON object with a string `hash`."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("hash"), str):
        return record
    return None


def _lines_backwards(fh: BinaryIO, end: int, limit: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes with its line break) of each line of the file, the last first, reading
    backwards in blocks; stops after `limit` bytes."""
    buf = b""  # the file's bytes from `pos` to `stop`
    pos = stop = end
    while stop > 0:
        cut = buf.rfind(b"\n", 0, len(buf) - 1)  # not the line's own line break
        while cut < 0 and pos > 0 and end - pos < limit:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut < 0 and pos > 0:
            return  # a line longer than the scan allows: give up
        start = pos + cut + 1
        yield start, buf[cut + 1 :]
        buf = buf[: cut + 1]
        stop = start


@dataclass(slots=True)
class _Recovered:
    prev: str = GENESIS  # the hash to chain from
    lead: bytes = b""  # to write before the first record (the file ends mid-line)
    resume: dict[str, Any] | None = None  # what was cut, for the resume record


def _recover(path: str) -> _Recovered:
    """Find the file's last whole record; move what follows it (a torn write) aside."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return _Recovered()
    with fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return _Recovered()
        fh.seek(end - 1)
        lead = b"" if fh.read(1) == b"\n" else b"\n"
        good_end = -1
        prev = GENESIS
        for start, line in _lines_backwards(fh, end, TORN_SCAN_BYTES):
            if not line.strip():
                continue
            record = _parse_line(line)
            if record is not None:
                good_end = start + len(line)
                prev = str(record["hash"])
                break
        if good_end < 0:
            # Not one record in reach: not (recognizably) an audit file, so nothing is cut.
            # `audit verify` will say so; keep serving, and chain afresh on a line of our own.
            log.error("audit_file_damaged", file=path, problem="no audit record found")
            return _Recovered(GENESIS, lead)
        fh.seek(good_end)
        tail = fh.read(end - good_end)
    if not tail.strip():
        return _Recovered(prev, lead)
    resume: dict[str, Any] = {
        "cut_bytes": len(tail),
        "cut_sha256": hashlib.sha256(tail).hexdigest(),
        "cut_at": good_end,
        "kept_in": None,
    }
    kept = None
    try:
        kept = _keep_aside(path, tail)
        os.truncate(path, good_end)  # refused for an append-only (chattr +a) file
    except OSError as exc:
        # The bytes stay in the file, on lines of their own before the resume record, which
        # states their digest (`audit verify` checks it).
        if kept is not None:
            with contextlib.suppress(OSError):
                os.unlink(kept)
        log.error("audit_torn_tail_kept_in_place", file=path, error=exc.strerror or str(exc))
        resume["newline_added"] = bool(lead)
        return _Recovered(prev, lead, resume)
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    resume["kept_in"] = os.path.basename(kept)
    log.warning("audit_torn_tail_cut", file=path, bytes=len(tail), kept_in=kept, at=good_end)
    return _Recovered(prev, b"", resume)


def _keep_aside(path: str, data: bytes) -> str:
    """Write `data` to a new `PATH.torn-<UTC time>[-n]` file, synced; return its path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        aside = f"{path}.torn-{stamp}" + (f"-{n}" if n else "")
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _sync_dir(aside)
        return aside
    raise OSError(f"no free name for {path}.torn-{stamp}")


def _sync_dir(path: str) -> None:
    """Make a new directory entry durable (best effort: not every platform opens directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Verification:
    """What `verify_chain` found: records checked, each resumption (a torn tail cut and the
    chain resumed), a torn tail not yet cut, and the first problem (tampering), if any."""

    records: int = 0
    resumptions: list[str] = field(default_factory=list)
    torn_tail: str | None = None
    problem: str | None = None
    last_hash: str = GENESIS  # what a file that continues this one (rotated) chains from


def verify_chain(path: str, prev: str = GENESIS) -> Verification:
    """Check a file's whole chain, across resumptions; `prev`: the last hash of the file it
    continues (log rotation), if any."""
    result = Verification()
    damaged = b""  # unparseable lines not yet accounted for by a resume record
    damaged_line = 0
    blank = b""  # blank lines since the last record (part of a torn tail that follows)
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                if damaged:
                    damaged += line
                else:
                    blank += line
                continue
            record = _parse_line(line)
            if record is None:
                if not damaged:
                    damaged_line = lineno
                    damaged = blank
                damaged += line
                continue
            blank = b""
            resume = record.get("resume")
            if damaged:
                if not isinstance(resume, dict):
                    if record.get("prev") == GENESIS:
                        # Written before resume records: a torn line, then a restarted chain.
                        result.resumptions.append(
                            f"line {lineno}: chain restarted after {len(damaged)} damaged bytes"
                            f" at line {damaged_line} (no resume record: an older callgate)"
                        )
                        prev = GENESIS
                    else:
                        result.problem = f"line {damaged_line}: not an audit record"
                        return result
                elif not _cut_matches(resume, damaged):
                    result.problem = (
                        f"line {damaged_line}: not an audit record (the damaged bytes differ"
                        f" from those the resume record at line {lineno} states)"
                    )
                    return result
                damaged = b""
            elif isinstance(resume, dict) and resume.get("kept_in") is None:
                result.problem = f"line {lineno}: resume record without the bytes it kept"
                return result
            stated = record.pop("hash")
            if record.get("prev") != prev:
                result.problem = (
                    f"line {lineno}: chain broken (record removed or reordered before it)"
                )
                return result
            if not _sealed(prev, line, stated, record):
                result.problem = f"line {lineno}: hash mismatch (record edited)"
                return result
            if isinstance(resume, dict):
                result.resumptions.append(_describe_resume(path, lineno, record, resume))
            prev = stated
            result.records += 1
    result.last_hash = prev
    if damaged:
        if damaged.endswith(b"\n"):
            result.problem = f"line {damaged_line}: not an audit record"
        else:
            result.torn_tail = (
                f"line {damaged_line}: {len(damaged)} bytes of a torn write (callgate cuts them"
                " on its next start)"
            )
    return result


def _cut_matches(resume: dict[str, Any], damaged: bytes) -> bool:
    """Whether the damaged lines kept in place are the bytes the resume record states."""
    if resume.get("kept_in") is not None:
        return False
    if resume.get("newline_added"):
        damaged = damaged[:-1] if damaged.endswith(b"\n") else damaged
    return (
        resume.get("cut_bytes") == len(damaged)
        and resume.get("cut_sha256") == hashlib.sha256(damaged).hexdigest()
    )


def _describe_resume(path: str, lineno: int, record: dict[str, Any], resume: dict[str, Any]) -> str:
    kept = resume.get("kept_in")
    where = "in place" if kept is None else f"kept in {kept}"
    text = (
        f"line {lineno}: resumed at {record.get('time')} after cutting"
        f" {resume.get('cut_bytes')} bytes (sha256 {resume.get('cut_sha256')}, {where})"
    )
    if isinstance(kept, str):
        aside = os.path.join(os.path.dirname(path), os.path.basename(kept))
        try:
            with open(aside, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError:
            text += "; that file is gone"
        else:
            if digest != resume.get("cut_sha256"):
                text += "; THAT FILE'S BYTES DIFFER"
    return text


def verify_file(path: str) -> tuple[int, str | None]:
    """(records checked, first problem or None); resumptions are not problems here."""
    result = verify_chain(path)
    return result.records, result.problem
