"""Audit: one structured record per decision, to structlog and to a hash-chained JSONL file.

Each file line is one JSON object: the record, then `prev` (the previous line's hash, or 64
zeros for the first), then `hash` as its last member. The hash covers the object's exact bytes:
with `body` = the object without its trailing `,"hash":"<64 hex>"}`, plus a closing `}` (the
object as serialized before `hash` was added), `hash` = sha256(prev + body) in hex. So each
record is serialized once, and editing any byte of a line's object, dropping or reordering
lines breaks the chain at that line (`callgate audit verify FILE`). Lines written before this
scheme (hash over the record's sorted-keys JSON) still verify. File writes happen in a
background task (never on the request path); `close()` flushes everything that was recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson
import structlog

from proxy.config import AuditConfig
from proxy.gates.decision import Decision
from proxy.timestamps import utc_iso
from proxy.toolcalls import CallContext

GENESIS = "0" * 64
RETRY_SECONDS = 1.0  # pause before retrying a failed audit file write
BATCH_SECONDS = 0.02  # how long records may wait to share a file write
REDACTED = "[REDACTED]"
_CONTAINERS = (dict, list)  # what redact() descends into
log = structlog.get_logger("callgate.audit")


def redact(value: Any, keys: frozenset[str]) -> Any:
    """`value` with the value of every dict key in `keys` replaced, at any depth.

    When no key matches (the usual case) `value` itself is returned, after a walk that only
    descends into nested dicts and lists.
    """
    if not keys or not _mentions(value, keys):
        return value
    return _redacted(value, keys)


def _mentions(value: Any, keys: frozenset[str]) -> bool:
    if isinstance(value, dict):
        if not keys.isdisjoint(value):
            return True
        value = value.values()
    elif not isinstance(value, list):
        return False
    for item in value:
        if isinstance(item, _CONTAINERS) and _mentions(item, keys):
            return True
    return False


def _redacted(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if k in keys else _redacted(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, keys) for v in value]
    return value


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
    legacy = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev.encode() + legacy).hexdigest() == stated


def _last_line(path: str) -> tuple[bytes | None, bool]:
    """The file's last non-empty line, and whether the file lacks a final newline.

    Reads backwards in blocks, so a long last record (large arguments) is read whole.
    """
    try:
        with open(path, "rb") as fh:
            return _last_line_of(fh)
    except FileNotFoundError:
        return None, False


def _last_line_of(fh: BinaryIO) -> tuple[bytes | None, bool]:
    end = fh.seek(0, os.SEEK_END)
    if end == 0:
        return None, False
    fh.seek(end - 1)
    unterminated = fh.read(1) != b"\n"
    buf = b""
    pos = end
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        stripped = buf.rstrip()
        cut = stripped.rfind(b"\n")
        if cut >= 0:
            return stripped[cut + 1 :], unterminated
    return buf.strip() or None, unterminated


def _last_hash(path: str) -> tuple[str, bool]:
    """The hash to chain from (the file's last record), and whether a newline must come first."""
    line, unterminated = _last_line(path)
    if line is None:
        return GENESIS, unterminated
    try:
        return str(orjson.loads(line)["hash"]), unterminated
    except (orjson.JSONDecodeError, KeyError, TypeError):
        # A torn write (crash mid-line) or a foreign line: `audit verify` will point at it.
        # Keep serving and keep auditing; the new records chain afresh after it.
        log.error("audit_file_damaged", file=path, problem="last line is not an audit record")
        return GENESIS, unterminated


class Auditor:
    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self._redact = frozenset(config.redact)
        self._unsealed: list[dict[str, Any]] = []  # recorded, not yet serialized
        self._pending: list[bytes] = []  # sealed lines not yet written
        self._prev = GENESIS
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.records = 0
        # Called with every record (metrics, tests); must not block.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lead = b""  # a newline to write first when the file ends mid-line
        if config.file:
            self._prev, unterminated = _last_hash(config.file)
            if unterminated:
                self._lead = b"\n"

    def reconfigure(self, config: AuditConfig) -> None:
        """Apply a reloaded policy's audit settings (the file itself changes on restart)."""
        self.config = config.model_copy(update={"file": self.config.file})
        self._redact = frozenset(config.redact)

    async def start(self) -> None:
        if self.config.file and self._task is None:
            self._task = asyncio.create_task(self._flusher())

    def record(
        self, decision: Decision, ctx: CallContext, outcome: str, action: str | None
    ) -> None:
        block = decision.block
        call = decision.call
        args = decision.args
        if args is None:
            # Not JSON (so blocked): kept as text, unless it names a redacted key, which a
            # text cannot be redacted around.
            args = call.arguments
            if any(key in args for key in self._redact):
                args = REDACTED
        elif self._redact:
            args = redact(args, self._redact)
        shadow = decision.shadow
        record: dict[str, Any] = {
            "time": utc_iso(),
            "request_id": ctx.request_id,
            "route": ctx.route,
            "principal": ctx.principal,
            "tool": call.name,
            "policy": decision.tool_policy,
            "call_id": call.id,
            "decision": outcome,
            "gate": block.gate if block else None,
            "reason": block.reason if block else None,
            "message": block.message if block else None,
            "action": action,
            "shadow": [{"gate": b.gate, "reason": b.reason, "message": b.message} for b in shadow]
            if shadow
            else [],
            "fail_open": decision.fail_open,
            "arguments": args,
            "latency_ms": round(decision.latency_ms, 3),
        }
        self.records += 1
        for listener in self.listeners:
            listener(record)
        if self.config.log:
            log.info("tool_call_decision", **record)
        if self.config.file and not self._closed:
            # Serialized and sealed with the batch it is written in: off the request path, and
            # cheaper run back to back.
            self._unsealed.append(record)
            self._wake.set()

    def _seal_unsealed(self) -> None:
        records, self._unsealed = self._unsealed, []
        prev = self._prev
        pending = self._pending
        for record in records:
            record["prev"] = prev
            prev, line = seal(prev, orjson.dumps(record))
            pending.append(line)
        self._prev = prev

    async def _flusher(self) -> None:
        while True:
            if self._pending and not self._closed:
                # The last write failed: try again after a pause, or as soon as woken.
                try:
                    await asyncio.wait_for(self._wake.wait(), RETRY_SECONDS)
                except TimeoutError:
                    pass
            else:
                await self._wake.wait()
                if not self._closed:
                    # Let a burst of decisions gather: one write (and one thread hop) for many.
                    await asyncio.sleep(BATCH_SECONDS)
            self._wake.clear()
            await self._flush()
            if self._closed:
                return

    async def _flush(self) -> bool:
        """Write what is pending. False (records kept for the next try) if the write failed."""
        if self._unsealed:
            self._seal_unsealed()
        if not self._pending or not self.config.file:
            return True
        batch, self._pending = self._pending, []
        data = self._lead + b"".join(batch)
        try:
            await asyncio.to_thread(_append, self.config.file, data)
        except OSError as exc:
            self._pending[:0] = batch  # keep order: these go before anything recorded since
            log.error(
                "audit_write_failed",
                file=self.config.file,
                error=exc.strerror or str(exc),
                pending=len(self._pending),
            )
            return False
        self._lead = b""
        return True

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        if not await self._flush():
            log.critical("audit_records_lost", file=self.config.file, records=len(self._pending))


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()


def verify_file(path: str) -> tuple[int, str | None]:
    """(records checked, first problem or None)."""
    prev = GENESIS
    count = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                stated = record.pop("hash") if isinstance(record, dict) else None
            except (orjson.JSONDecodeError, KeyError):
                stated = None
            if not isinstance(stated, str):
                return count, f"line {lineno}: not an audit record"
            if record.get("prev") != prev:
                return count, f"line {lineno}: chain broken (record removed or reordered before it)"
            if not _sealed(prev, line, stated, record):
                return count, f"line {lineno}: hash mismatch (record edited)"
            prev = stated
            count += 1
    return count, None
