"""State shared by the gates: sliding-window counters, spend ledgers and stashed blocked calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.store.base import (
    ChargeRequest,
    Outcome,
    Reservation,
    SlotRequest,
    Store,
    StoreError,
    key_part,
)

if TYPE_CHECKING:
    from proxy.config import StoreConfig

__all__ = [
    "ChargeRequest",
    "Outcome",
    "Reservation",
    "SlotRequest",
    "Store",
    "StoreError",
    "key_part",
]


def open_store(
    config: StoreConfig,
    clock: Callable[[], float] | None = None,
    *,
    stash_max_bytes: int | None = None,
) -> Store:
    """The store the config names. Memory takes an injectable wall clock (tests) and a bound on
    its stashes' bytes (Redis bounds its own memory: maxmemory)."""
    if config.backend == "redis":
        from proxy.store.redis import RedisStore

        return RedisStore(
            config.url,
            timeout=config.timeout,
            pool_size=config.pool_size,
            pool_timeout=config.pool_timeout,
            prefix=config.key_prefix,
        )
    from proxy.store.memory import MemoryStore

    if stash_max_bytes is None:
        return MemoryStore(clock=clock)
    return MemoryStore(clock=clock, stash_max_bytes=stash_max_bytes)
