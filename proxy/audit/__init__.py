"""Audit: one structured record per decision, to structlog and to a hash-chained JSONL file.

The package, one job a module: `chain` (the line format and its hash chain: sealing, `audit
verify`, cutting a torn tail on start), `records` (redaction, and the bounded, safe forms of a
record that cannot be written whole), `writer` (what appends sealed lines: one write(2) per
batch on the event loop with `fsync: never`, a thread of its own with `batch` and `always`).
The `Auditor` here ties them to the event loop.

Durability. Records are sealed in batches on the event loop (in record order, so the chain is)
and written a batch at a time, never one request at a time. A route that is about
to hand allowed calls to its client awaits `durable()` first: it returns once every record
recorded before it is in the file (written with write(2), so it survives a killed callgate; and
fdatasync'd first with `fsync: always`), or raises `AuditUnavailable` if the write failed, so
the calls are blocked rather than delivered unaudited. Waiters share writes (group commit): the
first waiter of a loop iteration flushes at the end of that iteration, one write and one
future for all records recorded by then. Records nobody waits for go out within
`BATCH_SECONDS`. `close()` flushes everything that was recorded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from mypy_extensions import mypyc_attr

from proxy.audit.chain import (
    GENESIS,
    TORN_SCAN_BYTES,
    Verification,
    _recover,
    seal,
    verify_chain,
    verify_file,
)
from proxy.audit.records import (
    MAX_FIELD_CHARS,
    PREVIEW_CHARS,
    REDACTED,
    _bounded_body,
    _digest_form,
    _preview,
    _safe_body,
    redact,
)
from proxy.audit.writer import RETRY_SECONDS, _InlineWriter, _Writer
from proxy.config import AuditConfig
from proxy.gates.decision import Block, Decision
from proxy.timestamps import utc_iso
from proxy.toolcalls import CallContext

__all__ = [
    "BATCH_SECONDS",
    "GENESIS",
    "MAX_FIELD_CHARS",
    "PREVIEW_CHARS",
    "REDACTED",
    "RETRY_SECONDS",
    "TORN_SCAN_BYTES",
    "AuditUnavailable",
    "Auditor",
    "Verification",
    "redact",
    "seal",
    "verify_chain",
    "verify_file",
]

BATCH_SECONDS = 0.02  # how long records nobody waits for may wait to share a file write
log = structlog.get_logger("callgate.audit")


class AuditUnavailable(Exception):
    """The audit file could not be written: calls waiting on their records must not go out."""


def _shadow_blocks(shadow: list[Block]) -> list[dict[str, str]]:
    return [{"gate": b.gate, "reason": b.reason, "message": b.message} for b in shadow]


def _add_outcome_fields(
    record: dict[str, Any], upstream_status: str | None, approval: dict[str, Any] | None
) -> None:
    if upstream_status is not None:  # action `reprompt_failed`: how the upstream failed it
        record["upstream_status"] = upstream_status
    if approval is not None:  # asked for, or passed with, a person's approval
        record["approval"] = approval


# Tests record decisions with a subclass of their own (compiled, callers take no other type).
@mypyc_attr(allow_interpreted_subclasses=True)
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
        self._batch_at = 0.0  # when that flush runs (loop time)
        self._writer: _Writer | _InlineWriter | None = None
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
                self._schedule(BATCH_SECONDS)

    def record(
        self,
        decision: Decision,
        ctx: CallContext,
        outcome: str,
        action: str | None,
        upstream_status: str | None = None,
    ) -> None:
        # Runs on every decision: the common case (JSON arguments, no redaction, no request
        # facts, no approval) takes no helper call; the rarer branches each have one.
        if decision.recorded:
            return  # recorded when it was sent, before its round was settled
        decision.recorded = True
        block = decision.block
        call = decision.call
        args = decision.args
        raw: str | None = call.arguments
        if args is None or self._redact:
            args, raw = self._recorded_args(call.arguments, args)
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
            "shadow": _shadow_blocks(shadow) if shadow else [],
            "fail_open": decision.fail_open,
            "arguments": args,
            "latency_ms": round(decision.latency_ms, 3),
        }
        if upstream_status is not None or decision.approval is not None:
            _add_outcome_fields(record, upstream_status, decision.approval)
        if ctx.model is not None or ctx.user is not None or ctx.metadata:
            # What rules may read as `request.*`: `callgate replay` re-decides with it.
            record["request"] = self._request_facts(ctx)
        if ctx.trace_id is not None:  # tracing is on: the record leads to the request's trace
            record["trace_id"] = ctx.trace_id
        self.records += 1
        for listener in self.listeners:
            listener(record)
        if self._log_records:
            self._log_decision(record, call.arguments, args, raw)
        if self._file and not self._closed:
            ctx.audit_batch = self._append(record, raw)

    def _recorded_args(self, text: str, args: Any) -> tuple[Any, str | None]:
        """The arguments as recorded, and the text they may be digested by (None when a
        redacted key was involved: a digest's preview would show it)."""
        if args is None:
            # Not JSON (so blocked): kept as text, unless it names a redacted key, which a
            # text cannot be redacted around.
            if any(key in text for key in self._redact):
                return REDACTED, None
            return text, text
        redacted = redact(args, self._redact)
        return redacted, (text if redacted is args else None)

    def _request_facts(self, ctx: CallContext) -> dict[str, Any]:
        metadata = redact(ctx.metadata, self._redact) if ctx.metadata else {}
        return {"model": ctx.model, "user": ctx.user, "metadata": metadata}

    def _log_decision(self, record: dict[str, Any], text: str, args: Any, raw: str | None) -> None:
        limit = self.config.max_argument_bytes
        if len(text) > limit:
            # The log line is bounded like the file's: no megabytes of arguments on stdout.
            preview = _preview(args)
            logged = _digest_form("truncated", f"over {limit} bytes", raw, preview)
            log.info("tool_call_decision", **{**record, "arguments": logged})
        else:
            log.info("tool_call_decision", **record)

    def _append(self, record: dict[str, Any], raw: str | None) -> int:
        """Queue a record for the file; returns the batch it goes out in."""
        # Serialized and sealed with the batch it is written in: cheaper run back to back.
        # The first record of a batch schedules its flush (sooner if someone waits).
        if not self._unsealed and self._loop is not None:
            self._schedule(BATCH_SECONDS)
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

    async def written(self, ctx: CallContext, window: float = 0.0) -> None:
        """Return once every record this request made is in the file (audit before delivery);
        raise `AuditUnavailable` if it could not be written. `window`: see durable()."""
        if ctx.audit_batch > self._written:
            await self.durable(window)

    def _schedule(self, delay: float) -> None:
        """Flush the gathered records `delay` seconds from now, unless a flush is due sooner."""
        assert self._loop is not None
        at = self._loop.time() + delay
        if self._batch is not None:
            if self._batch_at <= at:
                return
            self._batch.cancel()
        self._batch_at = at
        if delay <= 0:
            self._batch = self._loop.call_soon(self._flush)
        else:
            self._batch = self._loop.call_at(at, self._flush)

    async def durable(self, window: float = 0.0) -> None:
        """Return once every record recorded so far is in the file (and on disk with
        `fsync: always`); raise `AuditUnavailable` if it could not be written (it is retried
        in the background; the caller must not deliver the calls it recorded).

        Concurrent callers share one write: the first caller of a loop iteration has the
        records flushed at its end, and all wait for that batch's write. `window`: the
        caller may wait that long for others to join the write (streams reach their calls at
        different moments; without a window each would pay a write of its own).
        """
        if not self._file:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._unsealed:
            if self._closed:
                raise AuditUnavailable("audit file closed: records recorded after close")
            target = self._sealed + 1
            self._schedule(window)
        else:
            target = self._sealed
        if target <= self._written:
            return
        if self._closed and self._writer is None:
            raise AuditUnavailable("audit file closed with records unwritten")
        # A future per waiter (set in order as batches are written): one waiter's cancellation
        # touches nothing of the others', without a shield's extra future and callbacks.
        future = self._loop.create_future()
        self._waiters.append((target, future))
        await future

    def _flush(self) -> None:
        """Seal the records gathered so far (on the event loop: the chain is in record order)
        and hand their lines to the writer thread."""
        self._batch = None
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

    def _start_writer(self, path: str) -> _Writer | _InlineWriter:
        if self.config.fsync == "never":
            inline = _InlineWriter(path, self._lead, self._wrote, self._write_failed)
            self._lead = b""
            return inline
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
            if isinstance(writer, _InlineWriter):
                lost = writer.stop()
            else:
                lost = await asyncio.to_thread(writer.stop)
            if lost:
                log.critical("audit_records_lost", file=self._file, records=lost)
            else:
                self._wrote(self._sealed)
        self._fail_waiters(self._sealed, "audit file closed with records unwritten")
