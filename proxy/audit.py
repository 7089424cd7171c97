"""Audit: one structured record per decision, to structlog and to a hash-chained JSONL file.

Each file line is one JSON object: the record, then `prev` (the previous line's hash, or 64
zeros for the first), then `hash` as its last member. The hash covers the object's exact bytes:
with `body` = the object without its trailing `,"hash":"<64 hex>"}`, plus a closing `}` (the
object as serialized before `hash` was added), `hash` = sha256(prev + body) in hex. So each
record is serialized once, and editing any byte of a line's object, dropping or reordering
lines breaks the chain at that line (`callgate audit verify FILE`). Lines written before this
scheme (hash over the record's sorted-keys JSON) still verify. Records are sealed in batches
(`BATCH_SECONDS`) and written by a thread of the auditor's own, never on the request path;
`close()` flushes everything that was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable
from queue import Empty, SimpleQueue
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
_SCALARS = frozenset((str, int, float, bool, type(None)))  # what it never needs to look into
log = structlog.get_logger("callgate.audit")


def redact(value: Any, keys: frozenset[str]) -> Any:
    """`value` with the value of every dict key in `keys` replaced, at any depth.

    When no key matches (the usual case) `value` itself is returned, after a walk that only
    descends into nested dicts and lists.
    """
    if not keys:
        return value
    # The usual arguments, a flat object none of whose keys match, without the walk: type()
    # of each value, in C. Only known scalars qualify (a dict subclass must be walked).
    if (
        type(value) is dict
        and keys.isdisjoint(value)
        and _SCALARS.issuperset(map(type, value.values()))
    ):
        return value
    if not _mentions(value, keys):
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
        self._log_records = config.log
        self._file = config.file
        self._unsealed: list[dict[str, Any]] = []  # recorded, not yet serialized
        self._prev = GENESIS
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._batch: asyncio.TimerHandle | None = None  # the pending batch's flush
        self._writer: _Writer | None = None
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
        self._log_records = config.log

    async def start(self) -> None:
        if self._file and self._loop is None:
            self._loop = asyncio.get_running_loop()
            if self._unsealed:  # recorded before start
                self._batch = self._loop.call_later(BATCH_SECONDS, self._flush)

    def record(
        self,
        decision: Decision,
        ctx: CallContext,
        outcome: str,
        action: str | None,
        upstream_status: str | None = None,
    ) -> None:
        if decision.recorded:
            return  # recorded when it was sent, before its round was settled
        decision.recorded = True
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
        if block is None:
            gate = reason = message = None
        else:
            gate, reason, message = block.gate, block.reason, block.message
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
            "gate": gate,
            "reason": reason,
            "message": message,
            "action": action,
            "shadow": [{"gate": b.gate, "reason": b.reason, "message": b.message} for b in shadow]
            if shadow
            else [],
            "fail_open": decision.fail_open,
            "arguments": args,
            "latency_ms": round(decision.latency_ms, 3),
        }
        if upstream_status is not None:  # action `reprompt_failed`: how the upstream failed it
            record["upstream_status"] = upstream_status
        self.records += 1
        for listener in self.listeners:
            listener(record)
        if self._log_records:
            log.info("tool_call_decision", **record)
        if self._file and not self._closed:
            # Serialized and sealed with the batch it is written in: off the request path, and
            # cheaper run back to back. The first record of a batch schedules its flush.
            if not self._unsealed and self._loop is not None:
                self._batch = self._loop.call_later(BATCH_SECONDS, self._flush)
            self._unsealed.append(record)

    def _flush(self) -> None:
        """Seal the records gathered so far (on the event loop: the chain is in record order)
        and hand their lines to the writer thread."""
        self._batch = None
        records, self._unsealed = self._unsealed, []
        if not records or not self._file:
            return
        if self._writer is None:
            self._writer = self._start_writer(self._file)
        prev = self._prev
        prev_bytes = prev.encode()
        dumps = orjson.dumps
        sha256 = hashlib.sha256
        parts: list[bytes] = []
        add = parts.append
        for record in records:
            # seal(), inlined: a record's line is its JSON with `hash` added as last member.
            record["prev"] = prev
            body = dumps(record)
            prev = sha256(prev_bytes + body).hexdigest()
            prev_bytes = prev.encode()
            add(body[:-1])
            add(b',"hash":"')
            add(prev_bytes)
            add(b'"}\n')
        self._prev = prev
        self._writer.put(b"".join(parts), len(records))

    def _start_writer(self, path: str) -> _Writer:
        loop = asyncio.get_running_loop()

        def failed(error: str, pending: int) -> None:  # in the writer's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._write_failed, error, pending)

        writer = _Writer(path, self._lead, failed)
        self._lead = b""
        return writer

    def _write_failed(self, error: str, pending: int) -> None:
        log.error("audit_write_failed", file=self._file, error=error, pending=pending)

    async def close(self) -> None:
        self._closed = True
        if self._batch is not None:
            self._batch.cancel()
        self._flush()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        lost = await asyncio.to_thread(writer.stop)
        if lost:
            log.critical("audit_records_lost", file=self._file, records=lost)


class _Writer:
    """Appends sealed lines to the audit file from a thread of its own (a write may block; the
    event loop must not), in order, retrying what failed until it is written or stopped.

    One long-lived thread fed by a queue costs the event loop a queue put per batch, where a
    thread hop per batch (`asyncio.to_thread`) cost a future each way and a wake-up of the loop
    to hear back: several times the write itself. Failures are reported through `on_failure`.
    """

    def __init__(self, path: str, lead: bytes, on_failure: Callable[[str, int], None]) -> None:
        self._path = path
        self._lead = lead  # written before the first batch
        self._on_failure = on_failure
        self._queue: SimpleQueue[tuple[bytes, int] | None] = SimpleQueue()  # None: stop
        self._unwritten = 0
        self._thread = threading.Thread(target=self._run, name="callgate-audit", daemon=True)
        self._thread.start()

    def put(self, lines: bytes, records: int) -> None:
        self._queue.put((lines, records))

    def stop(self) -> int:
        """Write everything queued (one last try if writes fail), end the thread, and return
        how many records could not be written. Blocks: run it in a thread."""
        self._queue.put(None)
        self._thread.join()
        return self._unwritten

    def _run(self) -> None:
        chunks: list[bytes] = []  # not yet written, in order
        records = 0
        stopping = False
        while not stopping:
            try:
                # After a failed write: try again after a pause, or as soon as more arrives.
                item = self._queue.get(timeout=RETRY_SECONDS if chunks else None)
                while True:  # everything queued goes in the same write
                    if item is None:
                        stopping = True
                    else:
                        chunks.append(item[0])
                        records += item[1]
                    item = self._queue.get_nowait()
            except Empty:
                pass
            if not chunks:
                continue
            try:
                _append(self._path, self._lead + b"".join(chunks))
            except OSError as exc:
                self._on_failure(exc.strerror or str(exc), records)
                continue
            chunks = []
            records = 0
            self._lead = b""
        self._unwritten = records


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
