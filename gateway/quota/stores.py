"""Opens the quota store a config names: the one place that knows every store implementation.

``store`` defines the contract; ``memory_store`` and ``redis_store`` implement
it. This factory sits above all three, so the contract never imports an
implementation. Each implementation is imported only when named: a gateway with
``store: memory`` never loads the Redis client code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .store import SLOT_TTL_S, QuotaStore

if TYPE_CHECKING:
    from ..config import QuotaConfig
    from ..metrics import Metrics


def open_store(config: QuotaConfig, metrics: Metrics | None = None) -> QuotaStore:
    """The store ``config.store`` names: ``memory`` or a Redis URL (plain, TLS, unix, Sentinel, Cluster)."""
    if config.store == "memory":
        from .memory_store import MemoryStore

        return MemoryStore(metrics)
    from .redis_store import RedisStore

    return RedisStore(config, metrics, slot_ttl_s=SLOT_TTL_S)
