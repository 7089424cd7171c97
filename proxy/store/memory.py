"""In-process store: one replica, no set-up. Single-threaded asyncio makes each call atomic."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from proxy.store.base import ChargeRequest, Outcome, Reservation, SlotRequest

Entry = tuple[float, str, int]  # (timestamp, member id, micro-units or 0)
SWEEP_EVERY = 4096  # reservations between sweeps of stale keys


class _Log:
    """One key's entries inside its window, with their running total: checks are O(1)."""

    __slots__ = ("entries", "horizon", "last", "total")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.total = 0  # micro-units in `entries`
        self.last = float("-inf")  # newest entry ever recorded (cooldowns outlive windows)
        self.horizon = 0.0

    def prune(self, window: float, now: float) -> None:
        # An entry at t counts while t > now - window: exact at the boundary.
        entries = self.entries
        cutoff = now - window
        while entries and entries[0][0] <= cutoff:
            self.total -= entries.popleft()[2]

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.total += entry[2]
        if entry[0] > self.last:
            self.last = entry[0]

    def remove(self, member: str) -> None:
        for entry in self.entries:
            if entry[1] == member:
                self.entries.remove(entry)
                self.total -= entry[2]
                break
        self.last = max((e[0] for e in self.entries), default=float("-inf"))


class MemoryStore:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time
        self._logs: dict[str, _Log] = {}
        self._stash: dict[str, tuple[float, bytes]] = {}
        self._ids = itertools.count(1)
        self._until_sweep = SWEEP_EVERY

    def _log(self, key: str, window: float, horizon: float, now: float) -> _Log:
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = _Log()
        log.horizon = horizon
        log.prune(window, now)
        return log

    def _sweep(self, now: float) -> None:
        """Forget keys whose every entry is stale, and expired stashes: memory stays bounded
        by the principals active within a window, not by every principal ever seen."""
        for key in [k for k, log in self._logs.items() if log.last <= now - log.horizon]:
            del self._logs[key]
        for key in [k for k, (expires, _) in self._stash.items() if expires <= now]:
            del self._stash[key]

    async def reserve(self, items: Sequence[SlotRequest | ChargeRequest]) -> Reservation:
        now = self._clock()
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._until_sweep = SWEEP_EVERY
            self._sweep(now)
        outcomes = [
            self._check_slot(item, now)
            if type(item) is SlotRequest
            else self._check_charge(item, now)  # type: ignore[arg-type]
            for item in items
        ]
        for outcome, item in zip(outcomes, items, strict=True):
            if not outcome.ok and item.enforce:
                return Reservation(outcomes)
        token: list[tuple[str, str]] = []
        logs = self._logs
        for item, outcome in zip(items, outcomes, strict=True):
            if not outcome.ok:
                continue  # a shadow item that would have blocked records nothing
            member = str(next(self._ids))
            amount = item.cost_micros if type(item) is ChargeRequest else 0
            logs[item.key].add((now, member, amount))
            token.append((item.key, member))
        return Reservation(outcomes, token)

    def _check_slot(self, item: SlotRequest, now: float) -> Outcome:
        horizon = max(item.window, item.cooldown)
        log = self._log(item.key, horizon, horizon, now)
        count = 0
        if item.max_calls is not None:
            count = len(log.entries)
            if horizon > item.window:
                # A cooldown longer than the window keeps older entries: count only the
                # window's, newest first (the log is in time order).
                cutoff = now - item.window
                count = 0
                for entry in reversed(log.entries):
                    if entry[0] <= cutoff:
                        break
                    count += 1
        if item.cooldown:
            elapsed = now - log.last
            if elapsed < item.cooldown:
                return Outcome(
                    False,
                    "cooldown",
                    count=count,
                    elapsed=elapsed,
                    retry_after=item.cooldown - elapsed,
                )
        if item.max_calls is not None and count >= item.max_calls:
            retry = None
            if item.max_calls > 0:
                first = len(log.entries) - count  # the window's oldest entry
                retry = log.entries[first + count - item.max_calls][0] + item.window - now
            return Outcome(False, "max_calls", count=count, retry_after=retry)
        return Outcome(True, count=count)

    def _check_charge(self, item: ChargeRequest, now: float) -> Outcome:
        log = self._log(item.key, item.window, item.window, now)
        spent = log.total
        if spent + item.cost_micros <= item.max_micros:
            return Outcome(True, spent_micros=spent)
        retry = None
        if item.cost_micros <= item.max_micros:
            freed = 0
            for ts, _, amount in log.entries:
                freed += amount
                if spent - freed + item.cost_micros <= item.max_micros:
                    retry = ts + item.window - now
                    break
        return Outcome(False, "max_spend", spent_micros=spent, retry_after=retry)

    async def release(self, token: list[tuple[str, str]]) -> None:
        for key, member in token:
            log = self._logs.get(key)
            if log is not None:
                log.remove(member)

    async def put_stash(self, key: str, value: bytes, ttl: float) -> None:
        self._stash[key] = (self._clock() + ttl, value)

    async def get_stash_many(self, keys: list[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            hit = self._stash.get(key)
            if hit is not None and hit[0] <= now:
                del self._stash[key]
                hit = None
            out.append(hit[1] if hit else None)
        return out

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
