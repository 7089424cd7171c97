"""The store interface. Every backend implements the same all-or-nothing reservation.

A reservation asks for a rate-limit slot and a budget charge together: either every enforced
item is granted and recorded, or nothing is. Shadow items are checked and reported but never
block; they are recorded only when they would have passed, so a shadow limit counts the calls
it would have let through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


def key_part(value: str, reserved: str) -> str:
    """`value` with `%` and each character of `reserved` percent-escaped.

    Store keys are literal separators and variable parts (principals, tool names, call ids:
    some chosen by a client or a model). Each part is escaped for the separators that end it,
    so a key splits back into its parts one way only: principal "a:b" with call "c" and
    principal "a" with call "b:c" make different keys. Values without those characters, the
    usual case, are kept as they are (and so are the keys they made before).
    """
    if "%" not in value:
        for c in reserved:
            if c in value:
                break
        else:
            return value
    out = value.replace("%", "%25")
    for c in reserved:
        out = out.replace(c, f"%{ord(c):02X}")
    return out


OPEN_APPROVAL = ("pending", "approved", "denied")


class StoreError(Exception):
    """The store could not answer (down, slow, or broken); gates apply on_store_error."""


# The requests and outcomes below are built for every tool call: plain slotted dataclasses, as
# a frozen one's __init__ costs three times as much. Nothing mutates them after construction.


@dataclass(slots=True)
class SlotRequest:
    """One call against a sliding-window rate limit and/or a cooldown."""

    key: str
    max_calls: int | None
    window: float
    cooldown: float
    enforce: bool = True


@dataclass(slots=True)
class ChargeRequest:
    """One charge of `cost` micro-units against a ledger of `max_spend` per sliding window."""

    key: str
    max_micros: int
    window: float
    cost_micros: int
    enforce: bool = True


@dataclass(slots=True)
class Outcome:
    """What the store saw for one item. `limit` names which check failed, if any."""

    ok: bool
    limit: str = ""  # "" | "max_calls" | "cooldown" | "max_spend"
    count: int = 0  # calls in window (rate limit)
    elapsed: float = 0.0  # seconds since the last call (cooldown)
    spent_micros: int = 0  # spend in window (budget)
    retry_after: float | None = None


@dataclass(slots=True)
class Reservation:
    """One outcome per requested item, in order. Nothing is recorded if an enforced item failed."""

    outcomes: list[Outcome]
    # (key, member) pairs recorded by this reservation, for rollback.
    token: list[tuple[str, str]] = field(default_factory=list)


class Store(Protocol):
    async def reserve(self, items: Sequence[SlotRequest | ChargeRequest]) -> Reservation: ...

    async def reserve_many(
        self, calls: Sequence[Sequence[SlotRequest | ChargeRequest]]
    ) -> list[Reservation | StoreError]:
        """One reservation per call, in order, each all-or-nothing on its own (as if reserved
        one after another); a call the store could not answer gets its StoreError instead.
        Redis answers them all in one round trip."""
        ...

    async def release(self, token: list[tuple[str, str]]) -> None: ...

    async def put_stash(self, key: str, value: bytes, ttl: float) -> None: ...

    async def get_stash_many(self, keys: list[str]) -> list[bytes | None]: ...

    # Human approvals (proxy.approvals): records are JSON bytes whose state the store also
    # keeps beside them, so that every change of state is one atomic compare-and-set (two
    # replicas racing to use one grant: one wins). A digest (of the call the approval is for)
    # names the approval currently open for it: pending, approved (unused) or denied.

    async def put_approval(self, approval_id: str, digest: str, record: bytes, keep: float) -> str:
        """Store a new pending approval for `digest`, unless one is open for it already:
        the id of the open one (this one, if stored). Kept `keep` seconds."""
        ...

    async def find_approval(self, digest: str) -> bytes | None:
        """The approval open for `digest`, if any."""
        ...

    async def get_approval(self, approval_id: str) -> bytes | None: ...

    async def update_approval(
        self, approval_id: str, digest: str, expect: str, state: str, record: bytes
    ) -> bool:
        """Replace the record if its state is still `expect`; False if it was not (another
        replica or approver got there first). A state that is not open (used, expired) frees
        the digest for a new request."""
        ...

    async def list_approvals(self, limit: int) -> list[bytes]:
        """The newest `limit` approvals still kept, in no particular order."""
        ...

    async def push_approval_event(self, event: bytes) -> None:
        """An approval event made outside a server (the CLI), for a server to audit."""
        ...

    async def pop_approval_events(self, count: int) -> list[bytes]:
        """Take up to `count` such events (each is taken by one replica only)."""
        ...

    async def start(self) -> None:
        """Before serving: open connections, load scripts. Never raises for the store being down."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
