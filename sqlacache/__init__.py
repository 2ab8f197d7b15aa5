"""sqlacache: an automatic, correct query cache for SQLAlchemy 2.x.

    cache = configure(backend="redis://localhost:6379/1", models={"app.models.User": {"ops": "all"}})
    await cache.bind(engine)

Sessions on `engine` then serve `session.get(...)` and `session.execute(select(...))` from the
cache, and every commit evicts exactly what it made stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .config import CacheConfig, build_config
from .errors import CacheError, ConfigError, TransportError
from .manager import CacheManager
from .stats import HitHook, InvalidateHook, MismatchHook

__all__ = [
    "CacheConfig",
    "CacheError",
    "CacheManager",
    "ConfigError",
    "TransportError",
    "configure",
]
__version__ = "0.2.0"


def configure(
    backend: str | Mapping[str, Any] = "mem://",
    models: Mapping[Any, Mapping[str, Any] | None] | None = None,
    *,
    prefix: str = "sqlacache",
    default_timeout: int = 3600,
    serializer: str | None = "sqlalchemy",
    compress: str | None = None,
    secret: str | bytes | None = None,
    on_hit: HitHook | None = None,
    on_miss: HitHook | None = None,
    on_invalidate: InvalidateHook | None = None,
    on_mismatch: MismatchHook | None = None,
    verify: float = 0.0,
    volatile_functions: Iterable[str] | None = None,
    key_context: Callable[[Any], Any] | None = None,
    operation_timeout: float = 0.05,
    breaker_threshold: int = 3,
    breaker_probe_interval: float = 0.5,
    lease_timeout: float = 60.0,
    lock_timeout: float = 5.0,
    max_rows: int = 10_000,
    max_bytes: int = 4 * 1024 * 1024,
    local: bool | Mapping[str, int] | None = None,
    local_heartbeat: float = 0.5,
    cashews: Any = None,
) -> CacheManager:
    """Validate the configuration and return an unbound `CacheManager` (it connects to nothing).

    Raises `ConfigError` naming the culprit. Dotted class paths and `module.*` patterns are
    imported and checked at `bind()`.

    `verify` is the fraction of hits (0 to 1) that are also run on the database and compared
    with the cached result; `on_mismatch(model, op, key)` hears of every difference found.
    `local=True` (or `{"size": ..., "max_bytes": ...}`) keeps recent entries decoded in this
    process, kept exact over Redis pub/sub (see `sqlacache.local_tier`); `local_heartbeat` bounds
    how long a silent pub/sub connection can go unnoticed. `cashews=cache` makes the tags
    `{table}:{pk}` and `{table}` of the application's cashews cache follow every commit.
    """
    config = build_config(
        backend=backend,
        models=models,
        prefix=prefix,
        default_timeout=default_timeout,
        serializer=serializer,
        compress=compress,
        secret=secret,
        volatile_functions=volatile_functions,
        key_context=key_context,
        operation_timeout=operation_timeout,
        breaker_threshold=breaker_threshold,
        breaker_probe_interval=breaker_probe_interval,
        lease_timeout=lease_timeout,
        lock_timeout=lock_timeout,
        max_rows=max_rows,
        max_bytes=max_bytes,
        verify=verify,
        local=local,
        local_heartbeat=local_heartbeat,
        cashews=cashews,
    )
    return CacheManager(
        config,
        on_hit=on_hit,
        on_miss=on_miss,
        on_invalidate=on_invalidate,
        on_mismatch=on_mismatch,
    )
