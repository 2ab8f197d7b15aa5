"""Storage backends behind one interface (`base.Store`): the rest of sqlacache never asks which
backend it has. `make_store` picks one from the configured URL."""

from __future__ import annotations

from ..backend_config import BackendConfig
from .base import Bump, Fill, Store
from .memory import MemoryStore

__all__ = ["Bump", "Fill", "MemoryStore", "Store", "make_store"]


def make_store(backend: BackendConfig, operation_timeout: float) -> Store:
    if backend.is_memory:
        return MemoryStore(
            size=int(backend.options.get("size", 10_000)),
            max_bytes=int(backend.options.get("max_bytes", 256 * 1024 * 1024)),
        )
    if backend.cluster:
        from .cluster import ClusterStore

        return ClusterStore(backend, operation_timeout)
    from .redis import RedisStore  # redis-py is imported only for a Redis backend

    return RedisStore(backend, operation_timeout)
