"""In-process store: one replica, no set-up. Single-threaded asyncio makes each call atomic."""

from __future__ import annotations

import itertools
import sys
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.store.base import (
    OPEN_APPROVAL,
    ChargeRequest,
    Outcome,
    Reservation,
    SlotRequest,
    StoreError,
)

SWEEP_EVERY = 4096  # reservations between sweeps of stale keys, at least
STASH_MAX_BYTES = 64 * 1024 * 1024
# What a stash costs beyond its key and value objects (sys.getsizeof counts those): the
# (expiry, value, size) tuple, the float and int in it, and the ordered dict's slot and link
# (about 210 bytes measured with tracemalloc at 50k entries; rounded up).
STASH_ENTRY_OVERHEAD = 240
COMPACT_AT = 4096  # expired entries a log keeps at its head before giving the memory back
_NEVER = float("-inf")
# Approvals one process keeps (each holds a call's arguments): past it, the oldest that are no
# longer open are dropped; if all are open, a new request is refused (the gate fails closed).
MAX_APPROVALS = 10_000


class _Log:
    """One key's entries inside its window, with their running total: checks are O(1).

    Entries are three parallel typed arrays (timestamp, member id, micro-units), 24 bytes an
    entry against about 170 for a tuple of Python objects: an exact sliding window keeps every
    call inside it, so a one-hour budget at thousands of calls a second holds millions.
    Expired entries are dropped by moving `head`, and the arrays are compacted now and then.
    """

    __slots__ = ("amounts", "head", "horizon", "ids", "last", "ordered", "times", "total")

    def __init__(self) -> None:
        self.times = array("d")
        self.ids = array("q")
        self.amounts = array("q")
        self.head = 0  # index of the oldest live entry
        self.total = 0  # micro-units in the live entries
        self.last = _NEVER  # newest entry ever recorded (cooldowns outlive windows)
        self.horizon = 0.0
        # Whether the entries are in time order, so that the newest is the last. True unless
        # the clock went back (the wall clock can): then `remove` looks at every entry.
        self.ordered = True

    def __len__(self) -> int:
        return len(self.times) - self.head

    def prune(self, window: float, now: float) -> None:
        # An entry at t counts while t > now - window: exact at the boundary.
        times, amounts = self.times, self.amounts
        cutoff = now - window
        head, end = self.head, len(times)
        freed = 0
        while head < end and times[head] <= cutoff:
            freed += amounts[head]
            head += 1
        self.total -= freed
        if head >= COMPACT_AT and head * 2 >= end:
            del times[:head], self.ids[:head], amounts[:head]
            head = 0
        self.head = head

    def remove(self, member: int) -> None:
        ids = self.ids
        # A released entry is usually among the newest: search from the end.
        for i in range(len(ids) - 1, self.head - 1, -1):
            if ids[i] == member:
                self.total -= self.amounts[i]
                del self.times[i], ids[i], self.amounts[i]
                break
        # The newest entry left (not the newest ever: a released call never happened).
        if not len(self):
            self.last = _NEVER
        elif self.ordered:
            self.last = self.times[-1]
        else:
            self.last = max(self.times[self.head :])


@dataclass(slots=True)
class _Approval:
    state: str
    record: bytes
    until: float  # kept until (store clock)
    digest: str


class MemoryStore:
    """Rate-limit logs, budget ledgers and stashes of one process.

    Stashes are bounded in bytes (`stash_max_bytes`): past it the oldest are evicted, and
    `on_evict(n)` is told. A stash is a convenience for a client's next turn, and losing one
    costs that turn the blocked call's record. Logs are never evicted: dropping one inside its
    window would reset a limit. They are swept once stale, so they are bounded by the keys (tool
    x principal, ledger x principal) that recorded a call within their window.
    """

    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        *,
        stash_max_bytes: int = STASH_MAX_BYTES,
        on_evict: Callable[[int], object] | None = None,
    ) -> None:
        self._clock = clock or time.time
        self._logs: dict[str, _Log] = {}
        # key -> (expires, value, accounted bytes), oldest write first: evictions and expiry
        # (one TTL for every stash, so the oldest expires first) both pop from the front.
        self._stash: OrderedDict[str, tuple[float, bytes, int]] = OrderedDict()
        self.stash_bytes = 0
        self.stash_max_bytes = stash_max_bytes
        self.stash_evictions = 0
        self.on_evict = on_evict
        self._ids = itertools.count(1)
        self._until_sweep = SWEEP_EVERY
        # Approvals by id, oldest first; the open one's id by digest.
        self._approvals: OrderedDict[str, _Approval] = OrderedDict()
        self._approval_of: dict[str, str] = {}
        self._approval_events: deque[bytes] = deque(maxlen=MAX_APPROVALS)
        self.max_approvals = MAX_APPROVALS

    def _sweep(self, now: float) -> None:
        """Forget keys whose every entry is stale, and expired stashes: memory stays bounded
        by the principals active within a window, not by every principal ever seen."""
        for key in [k for k, log in self._logs.items() if log.last <= now - log.horizon]:
            del self._logs[key]
        for key in [k for k, (expires, _, _) in self._stash.items() if expires <= now]:
            self._drop_stash(key)
        # The next sweep waits for as many reservations as there are keys now: a sweep costs
        # O(1) per reservation however many principals are active.
        self._until_sweep = max(SWEEP_EVERY, len(self._logs) + len(self._stash))

    def _drop_stash(self, key: str) -> None:
        self.stash_bytes -= self._stash.pop(key)[2]

    async def reserve_many(
        self, calls: Sequence[Sequence[SlotRequest | ChargeRequest]]
    ) -> list[Reservation | StoreError]:
        # reserve() never suspends: nothing else runs between the calls, as in one Redis batch.
        results: list[Reservation | StoreError] = []
        for items in calls:
            try:
                results.append(await self.reserve(items))
            except StoreError as exc:
                results.append(exc)
        return results

    async def reserve(self, items: Sequence[SlotRequest | ChargeRequest]) -> Reservation:
        now = self._clock()
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._sweep(now)
        # Every item is checked before any is recorded (all or nothing), and each item's log
        # is kept for recording. (Plain loops: on the path of every tool call, a comprehension
        # or a strict zip costs more than the work it does.)
        known = self._logs
        outcomes: list[Outcome] = []
        logs: list[_Log] = []
        refused = False
        for item in items:
            log = known.get(item.key)
            if log is None:
                log = known[item.key] = _Log()
            if type(item) is SlotRequest:
                outcome = self._check_slot(item, log, now)
            else:
                outcome = self._check_charge(item, log, now)  # type: ignore[arg-type]
            outcomes.append(outcome)
            logs.append(log)
            if not outcome.ok and item.enforce:
                refused = True
        if refused:
            return Reservation(outcomes)
        token: list[tuple[str, str]] = []
        for item, outcome, log in zip(items, outcomes, logs):  # noqa: B905 (same lengths)
            if not outcome.ok:
                continue  # a shadow item that would have blocked records nothing
            member = next(self._ids)
            amount = item.cost_micros if type(item) is ChargeRequest else 0
            # _Log.add, inlined: one call fewer per item on every tool call.
            log.times.append(now)
            log.ids.append(member)
            log.amounts.append(amount)
            log.total += amount
            if now >= log.last:  # `last` is never older than an entry: still in time order
                log.last = now
            else:
                log.ordered = False
            token.append((item.key, str(member)))
        return Reservation(outcomes, token)

    def _check_slot(self, item: SlotRequest, log: _Log, now: float) -> Outcome:
        window = item.window
        cooldown = item.cooldown
        horizon = window if window >= cooldown else cooldown
        log.horizon = horizon
        times, head = log.times, log.head
        if head < len(times) and times[head] <= now - horizon:  # spare the call: none expired
            log.prune(horizon, now)
        max_calls = item.max_calls
        count = 0
        if max_calls is not None:
            count = len(log)
            if horizon > window:
                # A cooldown longer than the window keeps older entries: count only the
                # window's, newest first (the log is in time order).
                cutoff = now - window
                count = 0
                for i in range(len(times) - 1, log.head - 1, -1):
                    if times[i] <= cutoff:
                        break
                    count += 1
        if cooldown:
            elapsed = now - log.last
            if elapsed < cooldown:
                return Outcome(False, "cooldown", count, elapsed, 0, cooldown - elapsed)
        if max_calls is not None and count >= max_calls:
            retry = None
            if max_calls > 0:
                first = len(log.times) - count  # the window's oldest entry
                retry = log.times[first + count - max_calls] + window - now
            return Outcome(False, "max_calls", count, 0.0, 0, retry)
        # Positional arguments: a dataclass's keyword arguments cost half as much again.
        return Outcome(True, "", count)

    def _check_charge(self, item: ChargeRequest, log: _Log, now: float) -> Outcome:
        log.horizon = window = item.window
        times, head = log.times, log.head
        if head < len(times) and times[head] <= now - window:  # spare the call: none expired
            log.prune(window, now)
        spent = log.total
        if spent + item.cost_micros <= item.max_micros:
            return Outcome(True, "", 0, 0.0, spent)
        retry = None
        if item.cost_micros <= item.max_micros:
            freed = 0
            for i in range(log.head, len(log.times)):
                ts = log.times[i]
                freed += log.amounts[i]
                if spent - freed + item.cost_micros <= item.max_micros:
                    retry = ts + window - now
                    break
        return Outcome(False, "max_spend", 0, 0.0, spent, retry)

    async def release(self, token: list[tuple[str, str]]) -> None:
        for key, member in token:
            log = self._logs.get(key)
            if log is not None:
                log.remove(int(member))

    async def put_stash(self, key: str, value: bytes, ttl: float) -> None:
        now = self._clock()
        stash = self._stash
        if key in stash:
            self._drop_stash(key)  # a rewrite is accounted once, and is the newest again
        # A copy of exactly its length: orjson.dumps leaves a 4 KiB allocation behind even a
        # 50-byte result, which would make the real footprint many times what is counted.
        value = bytes(memoryview(value))
        size = sys.getsizeof(key) + sys.getsizeof(value) + STASH_ENTRY_OVERHEAD
        evicted = 0
        if size > self.stash_max_bytes:
            evicted = 1  # could never fit: kept no more than an evicted one would be
        else:
            stash[key] = (now + ttl, value, size)
            self.stash_bytes += size
        # From the oldest: drop the expired, then evict while over the bound. Each entry is
        # popped at most once, so this is O(1) per write, amortized.
        while stash:
            oldest = next(iter(stash))
            expires, _, old_size = stash[oldest]
            live = expires > now
            if live and self.stash_bytes <= self.stash_max_bytes:
                break
            del stash[oldest]
            self.stash_bytes -= old_size
            evicted += live
        if evicted:
            self.stash_evictions += evicted
            if self.on_evict is not None:
                self.on_evict(evicted)

    async def get_stash_many(self, keys: list[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            hit = self._stash.get(key)
            if hit is not None and hit[0] <= now:
                self._drop_stash(key)
                hit = None
            out.append(hit[1] if hit else None)
        return out

    def _live_approval(self, approval_id: str) -> _Approval | None:
        entry = self._approvals.get(approval_id)
        if entry is not None and entry.until <= self._clock():
            self._drop_approval(approval_id)
            return None
        return entry

    def _drop_approval(self, approval_id: str) -> None:
        entry = self._approvals.pop(approval_id)
        if self._approval_of.get(entry.digest) == approval_id:
            del self._approval_of[entry.digest]

    def _make_room(self) -> None:
        now = self._clock()
        for approval_id in [a for a, e in self._approvals.items() if e.until <= now]:
            self._drop_approval(approval_id)
        closed = [a for a, e in self._approvals.items() if e.state not in OPEN_APPROVAL]
        for approval_id in closed:  # oldest first
            if len(self._approvals) < self.max_approvals:
                return
            self._drop_approval(approval_id)
        if len(self._approvals) >= self.max_approvals:
            raise StoreError(f"approvals: {len(self._approvals)} open requests, no room")

    async def put_approval(self, approval_id: str, digest: str, record: bytes, keep: float) -> str:
        current = self._approval_of.get(digest)
        if current is not None:
            entry = self._live_approval(current)
            if entry is not None and entry.state in OPEN_APPROVAL:
                return current
        if len(self._approvals) >= self.max_approvals:
            self._make_room()
        self._approvals[approval_id] = _Approval("pending", record, self._clock() + keep, digest)
        self._approval_of[digest] = approval_id
        return approval_id

    async def find_approval(self, digest: str) -> bytes | None:
        current = self._approval_of.get(digest)
        entry = None if current is None else self._live_approval(current)
        if entry is None or entry.state not in OPEN_APPROVAL:
            return None
        return entry.record

    async def get_approval(self, approval_id: str) -> bytes | None:
        entry = self._live_approval(approval_id)
        return None if entry is None else entry.record

    async def update_approval(
        self, approval_id: str, digest: str, expect: str, state: str, record: bytes
    ) -> bool:
        entry = self._live_approval(approval_id)
        if entry is None or entry.state != expect:
            return False
        entry.state, entry.record = state, record
        if state not in OPEN_APPROVAL and self._approval_of.get(digest) == approval_id:
            del self._approval_of[digest]
        return True

    async def list_approvals(self, limit: int) -> list[bytes]:
        now = self._clock()
        found = [e.record for e in self._approvals.values() if e.until > now]
        return found[-limit:]

    async def push_approval_event(self, event: bytes) -> None:
        self._approval_events.append(event)

    async def pop_approval_events(self, count: int) -> list[bytes]:
        events = self._approval_events
        return [events.popleft() for _ in range(min(count, len(events)))]

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
