"""Audit: one structured record per decision, to structlog and to a hash-chained JSONL file.

Each file line is one JSON object: the record, then `prev` (the previous line's hash, or 64
zeros for the first), then `hash` as its last member. The hash covers the object's exact bytes:
with `body` = the object without its trailing `,"hash":"<64 hex>"}`, plus a closing `}` (the
object as serialized before `hash` was added), `hash` = sha256(prev + body) in hex. So each
record is serialized once, and editing any byte of a line's object, dropping or reordering
lines breaks the chain at that line (`callgate audit verify FILE`). Lines written before this
scheme (hash over the record's sorted-keys JSON) still verify.

Durability. Records are sealed in batches on the event loop (in record order, so the chain is)
and written by a thread of the auditor's own, never on the request path. A route that is about
to hand allowed calls to its client awaits `durable()` first: it returns once every record
recorded before it is in the file (written with write(2), so it survives a killed callgate; and
fdatasync'd first with `fsync: always`), or raises `AuditUnavailable` if the write failed, so
the calls are blocked rather than delivered unaudited. Waiters share writes (group commit): the
first waiter of a loop iteration flushes at the end of that iteration, one write and one
future for all records recorded by then. Records nobody waits for go out within
`BATCH_SECONDS`. `close()` flushes everything that was recorded.

Every record is serialized on its own: one that cannot be (nesting deeper than orjson's 254
levels, an int beyond 64 bits, a lone surrogate) is written in a bounded, safe form, as are
arguments longer than `max_argument_bytes`; no record can affect another's line.

A torn tail (callgate killed, or the machine lost power, mid-write) is moved aside on start
(`FILE.torn-<time>`), the file cut back to its last whole record, and a `resume` record that
states what was cut (bytes, sha256, where it was kept) continues the chain from there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
BATCH_SECONDS = 0.02  # how long records nobody waits for may wait to share a file write
REDACTED = "[REDACTED]"
PREVIEW_CHARS = 1024  # of arguments recorded as a digest
MAX_FIELD_CHARS = 4096  # a longer string field (a tool name, a call id) is cut in the file
TORN_SCAN_BYTES = 64 * 1024 * 1024  # how far back start-up looks for the last whole record
_CONTAINERS = (dict, list)  # what redact() descends into
_SCALARS = frozenset((str, int, float, bool, type(None)))  # what it never needs to look into
log = structlog.get_logger("callgate.audit")


class AuditUnavailable(Exception):
    """The audit file could not be written: calls waiting on their records must not go out."""


def redact(value: Any, keys: frozenset[str]) -> Any:
    """`value` with the value of every dict key in `keys` replaced, at any depth.

    When no key matches (the usual case) `value` itself is returned, after a walk that only
    descends into nested dicts and lists. Both walks use a stack of their own, not Python's:
    any depth works (arguments come from a JSON parser, so they hold no cycles).
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
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not keys.isdisjoint(item):
                return True
            stack.extend(v for v in item.values() if isinstance(v, _CONTAINERS))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, _CONTAINERS))
    return False


def _redacted(value: Any, keys: frozenset[str]) -> Any:
    if not isinstance(value, _CONTAINERS):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]  # (original, its copy being filled)
    while stack:
        src, dst = stack.pop()
        if isinstance(src, dict):
            for k, v in src.items():
                if k in keys:
                    dst[k] = REDACTED
                elif isinstance(v, _CONTAINERS):
                    child: Any = {} if isinstance(v, dict) else []
                    dst[k] = child
                    stack.append((v, child))
                else:
                    dst[k] = v
        else:
            for v in src:
                if isinstance(v, _CONTAINERS):
                    child = {} if isinstance(v, dict) else []
                    dst.append(child)
                    stack.append((v, child))
                else:
                    dst.append(v)
    return root


class _Raw(str):
    """A piece of JSON text to emit as is (in `_preview`'s work stack, among values)."""


def _json_string(text: str) -> str:
    try:
        return orjson.dumps(text).decode()
    except TypeError:  # a lone surrogate: the standard library escapes it as \\udxxx
        return json.dumps(text)


def _preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """The start (up to `limit` characters) of a JSON-like text of any value: any depth, any
    int, any string; other types as their repr. Stops as soon as it has `limit` characters,
    so its cost is bounded whatever the value's size."""
    out: list[str] = []
    size = 0
    stack: list[Any] = [value]
    seen: set[int] = set()
    while stack and size < limit:
        item = stack.pop()
        if type(item) is _Raw:
            text: str = item
        elif isinstance(item, dict | list):
            if id(item) in seen:  # not from a JSON parser, but never loop
                text = '"<cycle>"'
            else:
                seen.add(id(item))
                if isinstance(item, dict):
                    stack.append(_Raw("}"))
                    entries = list(item.items())
                    for i in range(len(entries) - 1, -1, -1):
                        key, child = entries[i]
                        stack.append(child)
                        name = key if isinstance(key, str) else str(key)
                        stack.append(_Raw(("," if i else "") + _json_string(name) + ":"))
                    text = "{"
                else:
                    stack.append(_Raw("]"))
                    for i in range(len(item) - 1, -1, -1):
                        stack.append(item[i])
                        if i:
                            stack.append(_Raw(","))
                    text = "["
        elif isinstance(item, str):
            text = _json_string(item[:limit])
        elif item is None or isinstance(item, bool):
            text = "null" if item is None else ("true" if item else "false")
        elif isinstance(item, int):
            try:
                text = str(item)
            except ValueError:  # more digits than Python will print
                text = f'"<int of {item.bit_length()} bits>"'
        elif isinstance(item, float):
            text = json.dumps(item)  # NaN and Infinity spelled out
        else:
            try:
                text = _json_string(repr(item)[:limit])
            except Exception:  # a broken __repr__
                text = f'"<{type(item).__name__}>"'
        out.append(text)
        size += len(text)
    return "".join(out)[:limit]


def _digest_form(marker: str, detail: Any, raw: str | None, preview: str) -> dict[str, Any]:
    """What the file holds in place of arguments that cannot be written (or not whole): the
    size and sha256 of the arguments as the model sent them, and the start of their text. No
    digest when a redacted key was involved: a digest of a short secret could be guessed."""
    form: dict[str, Any] = {marker: detail}
    if raw is None:
        form["redacted"] = True
    else:
        data = raw.encode("utf-8", "surrogatepass")
        form["bytes"] = len(data)
        form["sha256"] = hashlib.sha256(data).hexdigest()
    form["preview"] = preview
    return form


def _cut(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[:MAX_FIELD_CHARS]}...[{len(text)} chars, sha256 {digest}]"


def _bounded_body(record: dict[str, Any], raw: str | None, limit: int) -> bytes:
    """The line body of a record that serialized but came out larger than `limit`: arguments
    over `limit` become their digest form, other long strings are cut."""
    new: dict[str, Any] = {}
    for key, value in record.items():
        if key == "arguments":
            text = orjson.dumps(value)
            if len(text) > limit:
                preview = text[:PREVIEW_CHARS].decode("utf-8", "ignore")
                value = _digest_form("truncated", f"over {limit} bytes", raw, preview)
        elif key != "prev" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            value = _cut(value)
        new[key] = value
    return orjson.dumps(new)


def _safe_body(record: dict[str, Any], raw: str | None, limit: int) -> bytes:
    """The line body of a record orjson cannot serialize: each field that cannot be is
    replaced (arguments by their digest form, other fields by an escaped text of them and
    listed in `unserializable`); what can be is kept, bounded as usual."""
    new: dict[str, Any] = {}
    bad: list[str] = []
    prev = record.get("prev", GENESIS)
    for key, value in record.items():
        if key == "prev":
            continue
        try:
            text = orjson.dumps(value)
        except TypeError as exc:  # orjson.JSONEncodeError
            if key == "arguments":
                value = _digest_form("unserializable", str(exc), raw, _preview(value))
            else:
                bad.append(key)
                if isinstance(value, str):
                    value = value.encode("utf-8", "backslashreplace").decode()
                else:
                    value = _preview(value, MAX_FIELD_CHARS)
        else:
            if key == "arguments" and len(text) > limit:
                preview = text[:PREVIEW_CHARS].decode("utf-8", "ignore")
                value = _digest_form("truncated", f"over {limit} bytes", raw, preview)
        if key != "arguments" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            value = _cut(value)
        new[key] = value
    if bad:
        new["unserializable"] = bad
    new["prev"] = prev
    try:
        return orjson.dumps(new)
    except TypeError as exc:  # cannot happen by construction; still, never lose the line
        last: dict[str, Any] = {"time": utc_iso(), "unserializable": str(exc), "prev": prev}
        return orjson.dumps(last)


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


class Auditor:
    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self._redact = frozenset(config.redact)
        self._log_records = config.log
        self._file = config.file
        # Routes check this before awaiting durable(): without a file there is nothing to wait on.
        self.needs_wait = bool(config.file)
        # Recorded, not yet serialized: each record with the arguments text it may be
        # digested by (None when a redacted key was involved).
        self._unsealed: list[tuple[dict[str, Any], str | None]] = []
        self._prev = GENESIS
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._batch: asyncio.Handle | None = None  # the pending batch's flush
        self._batch_soon = False  # that flush runs at the end of this loop iteration
        self._writer: _Writer | None = None
        self._closed = False
        self._sealed = 0  # batches handed to the writer, numbered from 1
        self._written = 0  # of those, the last one known written
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self.records = 0
        # Called with every record (metrics, tests); must not block.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # The same, for event records (Auditor.event), which are not decisions.
        self.event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lead = b""  # a newline to write first when the file ends mid-line
        if config.file:
            recovered = _recover(config.file)
            self._prev, self._lead = recovered.prev, recovered.lead
            if recovered.resume is not None:
                resume = {"time": utc_iso(), "resume": recovered.resume}
                self._unsealed.append((resume, None))

    def reconfigure(self, config: AuditConfig) -> None:
        """Apply a reloaded policy's audit settings (the file and fsync change on restart)."""
        if config.fsync != self.config.fsync:
            log.warning(
                "policy_reload_partial", section="audit.fsync", detail="applies after a restart"
            )
        self.config = config.model_copy(
            update={"file": self.config.file, "fsync": self.config.fsync}
        )
        self._redact = frozenset(config.redact)
        self._log_records = config.log

    async def start(self) -> None:
        if self._file:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if self._unsealed and self._batch is None:  # recorded before start, or a resume
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
        raw: str | None = call.arguments
        if args is None:
            # Not JSON (so blocked): kept as text, unless it names a redacted key, which a
            # text cannot be redacted around.
            args = call.arguments
            if any(key in args for key in self._redact):
                args = REDACTED
                raw = None
        elif self._redact:
            args = redact(args, self._redact)
            if args is not decision.args:
                raw = None
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
            "groups": list(ctx.groups),
            "credential": ctx.credential,
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
        if decision.approval is not None:  # asked for, or passed with, a person's approval
            record["approval"] = decision.approval
        if ctx.model is not None or ctx.user is not None or ctx.metadata:
            # What rules may read as `request.*`: `callgate replay` re-decides with it.
            metadata = redact(ctx.metadata, self._redact) if ctx.metadata else {}
            record["request"] = {"model": ctx.model, "user": ctx.user, "metadata": metadata}
        if ctx.trace_id is not None:  # tracing is on: the record leads to the request's trace
            record["trace_id"] = ctx.trace_id
        self.records += 1
        for listener in self.listeners:
            listener(record)
        if self._log_records:
            limit = self.config.max_argument_bytes
            if len(call.arguments) > limit:
                # The log line is bounded like the file's: no megabytes of arguments on stdout.
                preview = _preview(args)
                logged = _digest_form("truncated", f"over {limit} bytes", raw, preview)
                log.info("tool_call_decision", **{**record, "arguments": logged})
            else:
                log.info("tool_call_decision", **record)
        if self._file and not self._closed:
            ctx.audit_batch = self._append(record, raw)

    def _append(self, record: dict[str, Any], raw: str | None) -> int:
        """Queue a record for the file; returns the batch it goes out in."""
        # Serialized and sealed with the batch it is written in: cheaper run back to back.
        # The first record of a batch schedules its flush (sooner if someone waits).
        if not self._unsealed and self._loop is not None:
            self._batch = self._loop.call_later(BATCH_SECONDS, self._flush)
        self._unsealed.append((record, raw))
        return self._sealed + 1

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        """A record that is not a tool call's decision (an approval approved, denied or
        expired): `{"time", "event": kind, ...fields}`, in the same chain, log and listeners.
        `await durable()` to know it is written."""
        record: dict[str, Any] = {"time": utc_iso(), "event": kind, **fields}
        if "arguments" in record and self._redact:
            record["arguments"] = redact(record["arguments"], self._redact)
        self.records += 1
        for listener in self.event_listeners:
            listener(record)
        if self._log_records:
            # `event` is structlog's own first argument: the kind goes as `kind`.
            log.info("audit_event", kind=kind, **{k: v for k, v in record.items() if k != "event"})
        if self._file and not self._closed:
            self._append(record, None)

    def unwritten(self, ctx: CallContext) -> bool:
        """Whether a record this request made is not yet in the file: a plain comparison, so
        every write to a client can afford to ask."""
        return ctx.audit_batch > self._written

    async def written(self, ctx: CallContext) -> None:
        """Return once every record this request made is in the file (audit before delivery);
        raise `AuditUnavailable` if it could not be written."""
        if ctx.audit_batch > self._written:
            await self.durable()

    async def durable(self) -> None:
        """Return once every record recorded so far is in the file (and on disk with
        `fsync: always`); raise `AuditUnavailable` if it could not be written (it is retried
        in the background; the caller must not deliver the calls it recorded).

        Concurrent callers share one write: the first caller of a loop iteration has the
        records flushed at its end, and all wait on that batch's one future.
        """
        if not self._file:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._unsealed:
            if self._closed:
                raise AuditUnavailable("audit file closed: records recorded after close")
            target = self._sealed + 1
            if not self._batch_soon:
                if self._batch is not None:
                    self._batch.cancel()
                self._batch = self._loop.call_soon(self._flush)
                self._batch_soon = True
        else:
            target = self._sealed
        if target <= self._written:
            return
        if self._waiters and self._waiters[-1][0] == target:
            future = self._waiters[-1][1]
        elif self._closed and self._writer is None:
            raise AuditUnavailable("audit file closed with records unwritten")
        else:
            future = self._loop.create_future()
            self._waiters.append((target, future))
        try:
            # Shielded: one waiter's cancellation must not cancel the batch's shared future.
            await asyncio.shield(future)
        except AuditUnavailable as exc:
            raise AuditUnavailable(str(exc)) from None  # a fresh one per waiter

    def _flush(self) -> None:
        """Seal the records gathered so far (on the event loop: the chain is in record order)
        and hand their lines to the writer thread."""
        self._batch = None
        self._batch_soon = False
        items, self._unsealed = self._unsealed, []
        if not items or not self._file:
            return
        if self._writer is None:
            self._writer = self._start_writer(self._file)
        limit = self.config.max_argument_bytes
        prev = self._prev
        dumps = orjson.dumps
        lines: list[bytes] = []
        add = lines.append
        for record, raw in items:
            record["prev"] = prev
            try:
                body = dumps(record)
            except TypeError:  # orjson.JSONEncodeError: this record alone, in a safe form
                body = _safe_body(record, raw, limit)
            else:
                if len(body) > limit:
                    body = _bounded_body(record, raw, limit)
            prev, line = seal(prev, body)
            add(line)
        self._prev = prev
        self._sealed += 1
        self._writer.put(b"".join(lines), len(items), self._sealed)

    def _start_writer(self, path: str) -> _Writer:
        loop = asyncio.get_running_loop()

        def tell(callback: Callable[..., None], *args: Any) -> None:  # in the writer's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(callback, *args)

        writer = _Writer(
            path,
            self._lead,
            self.config.fsync,
            lambda seq: tell(self._wrote, seq),
            lambda error, pending, seq: tell(self._write_failed, error, pending, seq),
        )
        self._lead = b""
        return writer

    def _wrote(self, seq: int) -> None:
        """Batches up to `seq` are written: their waiters go on."""
        self._written = max(self._written, seq)
        waiters = self._waiters
        while waiters and waiters[0][0] <= seq:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(None)

    def _write_failed(self, error: str, pending: int, seq: int) -> None:
        log.error("audit_write_failed", file=self._file, error=error, pending=pending)
        self._fail_waiters(seq, f"audit file not written: {error}")

    def _fail_waiters(self, seq: int, error: str) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= seq:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_exception(AuditUnavailable(error))
                future.exception()  # retrieved: no warning if every waiter was cancelled

    async def close(self) -> None:
        self._closed = True
        if self._batch is not None:
            self._batch.cancel()
        self._flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            lost = await asyncio.to_thread(writer.stop)
            if lost:
                log.critical("audit_records_lost", file=self._file, records=lost)
            else:
                self._wrote(self._sealed)
        self._fail_waiters(self._sealed, "audit file closed with records unwritten")


class _Writer:
    """Appends sealed lines to the audit file from a thread of its own (a write may block; the
    event loop must not), in order, retrying what failed until it is written or stopped.

    One long-lived thread fed by a queue costs the event loop a queue put per batch, where a
    thread hop per batch (`asyncio.to_thread`) cost a future each way. Everything queued while
    a write (or fsync) is under way goes in the next write. The file stays open (O_APPEND): an
    fdatasync needs the fd, and a stat() per write (about what an open() and close() cost)
    notices when the path names another file (rotated away, deleted) to reopen it. Each written
    batch number is reported through `on_written`, failures through `on_failure`.
    """

    def __init__(
        self,
        path: str,
        lead: bytes,
        fsync: str,
        on_written: Callable[[int], None],
        on_failure: Callable[[str, int, int], None],
    ) -> None:
        self._path = path
        self._lead = lead  # written before the first batch
        self._fsync = fsync
        self._on_written = on_written
        self._on_failure = on_failure
        self._queue: SimpleQueue[tuple[bytes, int, int] | None] = SimpleQueue()  # None: stop
        self._unwritten = 0
        self._fd = -1
        self._ident: tuple[int, int] = (-1, -1)  # the open file's (inode, device)
        # Held to replace the fd (rotation) and, with fsync: batch, around each fdatasync.
        self._fd_lock = threading.Lock()
        self.writes = 0  # write() batches that completed (tests, benchmark)
        self._thread = threading.Thread(target=self._run, name="callgate-audit", daemon=True)
        self._thread.start()
        self._dirty = threading.Event()  # fsync: batch; written since the last fdatasync began
        self._stopping = False
        self._syncer: threading.Thread | None = None
        if fsync == "batch":
            self._syncer = threading.Thread(
                target=self._sync_behind, name="callgate-audit-sync", daemon=True
            )
            self._syncer.start()

    def put(self, lines: bytes, records: int, seq: int) -> None:
        self._queue.put((lines, records, seq))

    def stop(self) -> int:
        """Write everything queued (one last try if writes fail), end the thread, and return
        how many records could not be written. Blocks: run it in a thread."""
        self._queue.put(None)
        self._thread.join()
        if self._syncer is not None:
            self._stopping = True
            self._dirty.set()
            self._syncer.join()
        if self._fd >= 0:
            os.close(self._fd)
        return self._unwritten

    def _run(self) -> None:
        data = b""  # not yet written, in order (what is left of it after a short write)
        records = 0
        seq = 0  # the last batch in `data`
        stopping = False
        while not stopping:
            chunks = [data] if data else []
            try:
                # After a failed write: try again after a pause, or as soon as more arrives.
                item = self._queue.get(timeout=RETRY_SECONDS if data else None)
                while True:  # everything queued goes in the same write
                    if item is None:
                        stopping = True
                    else:
                        chunks.append(item[0])
                        records += item[1]
                        seq = item[2]
                    item = self._queue.get_nowait()
            except Empty:
                pass
            if not chunks:
                continue
            data = b"".join(chunks)
            if self._lead:
                data, self._lead = self._lead + data, b""
            written = 0
            try:
                fd = self._open()
                view = memoryview(data)
                while written < len(data):
                    written += os.write(fd, view[written:])
            except OSError as exc:
                # Keep what did not go out: a short write is not retried whole, which would
                # repeat the bytes that made it.
                data = data[written:]
                self._on_failure(exc.strerror or str(exc), records, seq)
                continue
            data = b""
            self.writes += 1
            records = 0
            if self._fsync == "always" and not self._sync(seq):
                continue
            self._on_written(seq)
            if self._fsync == "batch":
                self._dirty.set()
        self._unwritten = records

    def _sync_behind(self) -> None:
        """fsync: batch. One fdatasync after another while writes come in, in a thread of its
        own so that writes (and their waiters) never queue behind one: on power loss, what
        was written while the last fdatasync ran is what may be lost."""
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with self._fd_lock:
                if self._fd >= 0:
                    self._sync(None)
            if self._stopping and not self._dirty.is_set():
                return

    def _open(self) -> int:
        """The file's fd, opened again when the path names another file (or none) than the
        one open: rotated away or deleted, the records go on at the path."""
        if self._fd >= 0:
            try:
                current = os.stat(self._path)
                if (current.st_ino, current.st_dev) == self._ident:
                    return self._fd
            except FileNotFoundError:
                pass
        created = not os.path.exists(self._path)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        opened = os.fstat(fd)
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._ident = fd, (opened.st_ino, opened.st_dev)
        if created and self._fsync != "never":
            _sync_dir(self._path)
        return fd

    def _sync(self, seq: int | None) -> bool:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            # The bytes are written but may not be on the disk: the waiters learn it; writing
            # them again would repeat them in the file.
            error = f"fdatasync: {exc.strerror or exc}"
            log.error("audit_fsync_failed", file=self._path, error=error)
            if seq is not None:
                self._on_failure(error, 0, seq)
            return False
        return True


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
