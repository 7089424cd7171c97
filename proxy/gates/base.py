"""The Gate interface: the steps a tool call passes, compiled per tool by the policy, in order.

Two kinds, because their verdicts come from different places:

- a `Check` decides from the call alone (its arguments, the request facts) or asks the store
  itself; it returns a `Block` to stop the call, or None to pass it on. `check` may be a
  coroutine function (a gate that waits on someone, like human approval).
- a `Reservation` is decided by the store: each one contributes an item (a rate-limit slot, a
  budget charge) to the call's single all-or-nothing reservation, so a budget block never
  leaves a rate-limit slot consumed.

A gate's `name` is the gate named in blocks, audit records and metrics ("rules", "rate_limit",
"budget"); several checks may share one (the arguments, allow list, schema and CEL rules all
block as "rules"), and then they run as one group: in shadow mode the group's first block is
recorded and the rest of the group is skipped. `kind` names the step itself (explain shows it).

Adding a gate: one module with a `build(tool) -> Gate | None` and a line in
`proxy.gates.registry.BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from proxy.gates.decision import Block, Decision
from proxy.store import ChargeRequest, Outcome, SlotRequest
from proxy.toolcalls import CallContext

StoreItem = SlotRequest | ChargeRequest


class Check(Protocol):
    # Read-only members (properties here): the gates are frozen dataclasses.
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def enforce(self) -> bool: ...
    @property
    def needs_args(self) -> bool:
        """Skipped when the call's arguments could not be read (`decision.unread`)."""
        ...

    def check(
        self, decision: Decision, ctx: CallContext
    ) -> Block | Awaitable[Block | None] | None:
        """The call's verdict at this step; may set `decision.args` (the arguments step)."""
        ...

    def describe(self) -> str:
        """What the step checks, for `callgate explain` ("" when it has nothing to add)."""
        ...


class Reservation(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def enforce(self) -> bool: ...
    @property
    def on_store_error(self) -> str:
        """"fail_open" | "fail_closed"."""
        ...
    @property
    def constant(self) -> bool:
        """The item depends only on the tool and the principal: the pipeline builds it once per
        pair and keeps it with the policy."""
        ...

    def request(self, decision: Decision, ctx: CallContext) -> StoreItem | Block:
        """The item to reserve, or a Block when the call cannot be priced."""
        ...

    def block_for(self, outcome: Outcome, item: StoreItem) -> Block:
        """The block the store's refusal of `item` means."""
        ...

    def describe_item(self, item: StoreItem) -> str:
        """The item in words, for `callgate explain`."""
        ...


Gate = Check | Reservation
