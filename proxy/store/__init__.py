"""State shared by the gates: sliding-window counters, spend ledgers and stashed blocked calls."""

from proxy.store.base import (
    ChargeRequest,
    Outcome,
    Reservation,
    SlotRequest,
    Store,
    StoreError,
)

__all__ = ["ChargeRequest", "Outcome", "Reservation", "SlotRequest", "Store", "StoreError"]


def open_store(config, clock=None) -> Store:  # type: ignore[no-untyped-def]
    """The store the config names. Memory takes an injectable wall clock (tests)."""
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

    return MemoryStore(clock=clock)
