"""The audit file's writers: append sealed lines, in order, retrying what failed.

Two writers with one surface (`put`, `stop`, `writes`), chosen by `audit.fsync`:

- `never` (the default): `_InlineWriter` writes each batch with one write(2) on the event loop,
  as the request log does. write(2) to a regular file copies into the page cache and returns:
  a record written so survives a killed callgate, which is all `never` promises. Measured
  under streaming load, handing each batch to a thread cost 35 µs of CPU per stream (10% of
  callgate's throughput): the two threads took turns on the GIL around every batch.
- `batch` and `always`: `_Writer` writes from a thread of its own, as fdatasync takes
  milliseconds that the event loop must not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue

import structlog

from proxy.audit.chain import _sync_dir

RETRY_SECONDS = 1.0  # pause before retrying a failed audit file write
# How often a write checks whether the path still names the open file (rotated away, deleted):
# a stat() per write cost about 10% of the writer thread's time under streaming load.
ROTATION_CHECK_SECONDS = 1.0
log = structlog.get_logger("callgate.audit")


class _AuditFile:
    """The open audit file (O_APPEND): opened again when the path names another file (rotated
    away, deleted), and a batch written whole or its unwritten rest kept for the retry."""

    def __init__(self, path: str, lead: bytes, fsync: str) -> None:
        self._path = path
        self._lead = lead  # written before the first batch
        self._fsync = fsync
        self._fd = -1
        self._ident: tuple[int, int] = (-1, -1)  # the open file's (inode, device)
        self._checked = 0.0  # when the path was last compared with the open file (monotonic)
        # Held to replace the fd (rotation) and, with fsync: batch, around each fdatasync.
        self._fd_lock = threading.Lock()
        self.writes = 0  # write() batches that completed (tests, benchmark)

    def _append(self, data: bytes) -> tuple[bytes, str | None]:
        """Write `data` (after the lead, the first time): (b"", None), or what did not go out
        and why. A short write is not retried whole, which would repeat the bytes that made it."""
        if self._lead:
            data, self._lead = self._lead + data, b""
        written = 0
        try:
            fd = self._open()
            view = memoryview(data)
            while written < len(data):
                written += os.write(fd, view[written:])
        except OSError as exc:
            return data[written:], exc.strerror or str(exc)
        self.writes += 1
        return b"", None

    def _open(self) -> int:
        """The file's fd, opened again when the path names another file (or none) than the
        one open: rotated away or deleted, the records go on at the path."""
        if self._fd >= 0:
            now = time.monotonic()
            if now - self._checked < ROTATION_CHECK_SECONDS:
                return self._fd
            self._checked = now
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


class _InlineWriter(_AuditFile):
    """`fsync: never`: each batch written on the event loop as it is handed over, in order.

    Each written batch number is reported through `on_written`, failures through `on_failure`,
    both before `put` returns. What failed is kept, in order, and tried again with the next
    batch or after RETRY_SECONDS, whichever comes first.
    """

    def __init__(
        self,
        path: str,
        lead: bytes,
        on_written: Callable[[int], None],
        on_failure: Callable[[str, int, int], None],
    ) -> None:
        super().__init__(path, lead, "never")
        self._on_written = on_written
        self._on_failure = on_failure
        self._pending: list[bytes] = []  # not yet written, in order
        self._records = 0  # records in _pending
        self._seq = 0  # the last batch in _pending
        self._retry: asyncio.TimerHandle | None = None

    def put(self, lines: bytes, records: int, seq: int) -> None:
        self._pending.append(lines)
        self._records += records
        self._seq = seq
        self._drain()

    def _drain(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        rest, error = self._append(data)
        if error is not None:
            self._pending = [rest] if rest else []
            self._on_failure(error, self._records, self._seq)
            with contextlib.suppress(RuntimeError):  # no running loop: stop() tries once more
                loop = asyncio.get_running_loop()
                self._retry = loop.call_later(RETRY_SECONDS, self._drain)
            return
        self._pending = []
        self._records = 0
        self._on_written(self._seq)

    def stop(self) -> int:
        """One last try at what is pending; returns how many records could not be written."""
        self._drain()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return self._records


class _Writer(_AuditFile):
    """Appends sealed lines to the audit file from a thread of its own (fdatasync takes
    milliseconds; the event loop must not wait them), in order, retrying what failed until it
    is written or stopped.

    One long-lived thread fed by a queue costs the event loop a queue put per batch, where a
    thread hop per batch (`asyncio.to_thread`) cost a future each way. Everything queued while
    a write (or fsync) is under way goes in the next write. The file stays open (O_APPEND): an
    fdatasync needs the fd. Each written batch number is reported through `on_written`,
    failures through `on_failure`.
    """

    def __init__(
        self,
        path: str,
        lead: bytes,
        fsync: str,
        on_written: Callable[[int], None],
        on_failure: Callable[[str, int, int], None],
    ) -> None:
        super().__init__(path, lead, fsync)
        self._on_written = on_written
        self._on_failure = on_failure
        self._queue: SimpleQueue[tuple[bytes, int, int] | None] = SimpleQueue()  # None: stop
        self._unwritten = 0
        # Not `_thread`: mypyc names the field `__thread` in C, a keyword of gcc.
        self._worker = threading.Thread(target=self._run, name="callgate-audit", daemon=True)
        self._worker.start()
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
        self._worker.join()
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
            data, error = self._append(b"".join(chunks))
            if error is not None:
                self._on_failure(error, records, seq)
                continue
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
