"""The public cache object: `configure()` returns a `CacheManager`; `bind()` wires it to engines.

The manager holds the configuration, the bindings and the public methods. What a bound cache is
made of is assembled by `binding.Bound` at the first bind and dropped by `disconnect()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine, Result
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from ._greenlet import greenlet_spawn
from .binding import Bound
from .config import CacheConfig
from .decision import force_options
from .errors import CacheUnavailable, ConfigError, TransportError
from .invalidation import check_invalidate_all_call, invalidation_targets, pks_list
from .keys import Namespace
from .resilience import Breaker
from .stats import HitHook, Hook, InvalidateHook, MismatchHook, Stats, namespace_stats

_instances = itertools.count(1)


class CacheManager:
    """A configured cache. Call `await bind(engine)`; sessions on that engine are then cached."""

    def __init__(
        self,
        config: CacheConfig,
        *,
        on_hit: HitHook | None = None,
        on_miss: HitHook | None = None,
        on_invalidate: InvalidateHook | None = None,
        on_mismatch: MismatchHook | None = None,
    ) -> None:
        self.config = config
        self.instance_id = next(_instances)
        self.namespace = Namespace(config.prefix)
        self.counters = Stats()
        self.on_hit, self.on_miss = on_hit, on_miss
        self.on_invalidate, self.on_mismatch = on_invalidate, on_mismatch
        self.breaker = Breaker(
            config.breaker_threshold, config.breaker_probe_interval, self.counters
        )
        self._bound: Bound | None = None

    # -- hooks (assignable, as upstream's users do) ---------------------------------------------

    on_hit = Hook[HitHook]("Called as `on_hit(model, op)` when a read is served from the cache.")
    on_miss = Hook[HitHook](
        "Called as `on_miss(model, op)` when a cached read goes to the database."
    )
    on_invalidate = Hook[InvalidateHook]("Called as `on_invalidate(table, pks)` per invalidation.")
    on_mismatch = Hook[MismatchHook](
        "Called as `on_mismatch(model, op, key)` when a verified hit differs from the database."
    )

    # -- binding --------------------------------------------------------------------------------

    async def bind(self, engine: AsyncEngine | Engine, database_id: str | None = None) -> None:
        """Cache the ORM sessions of `engine`. May be called for several engines.

        Raises `ConfigError` if Redis answers that the configuration is wrong (a bad password, a
        database number out of range, an ACL denial); an unreachable Redis is an outage, not an
        error: the cache starts closed and the database serves meanwhile.
        """
        sync_engine = self._hook_engine(engine, database_id)
        if sync_engine is not None:
            await greenlet_spawn(self._parts().register_database, sync_engine)

    def bind_sync(self, engine: Engine | AsyncEngine, database_id: str | None = None) -> None:
        """`bind()` for a sync `Engine` and `Session`; same configuration and guarantees."""
        sync_engine = self._hook_engine(engine, database_id)
        if sync_engine is not None:
            self._parts().register_database(sync_engine)

    def _hook_engine(self, engine: AsyncEngine | Engine, database_id: str | None) -> Engine | None:
        """Install the listeners for `engine`; return its sync engine, or None if bound already."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not isinstance(sync_engine, Engine):
            raise ConfigError(f"bind() takes an AsyncEngine or Engine, got {type(engine).__name__}")
        if database_id is not None and (not isinstance(database_id, str) or not database_id):
            raise ConfigError(f"database_id must be a non-empty string, got {database_id!r}")
        self.config.resolve_imports()
        return sync_engine if self._parts().add_engine(sync_engine, database_id) else None

    def _parts(self) -> Bound:
        if self._bound is None:
            self._bound = Bound(
                self.config, self.namespace, self.counters, self.breaker, self.instance_id
            )
        return self._bound

    async def disconnect(self) -> None:
        """Remove every listener and close the backend; sessions keep working, uncached."""
        if self._bound is not None:
            await self._bound.runtime.background.wait(timeout=1.0)
        bound = self._unhook()
        if bound is not None:
            with contextlib.suppress(Exception):
                await bound.runtime.store.raw.aclose()

    def disconnect_sync(self) -> None:
        """`disconnect()` from synchronous code."""
        bound = self._unhook()
        if bound is not None:
            with contextlib.suppress(Exception):
                bound.runtime.store.raw.close()

    def _unhook(self) -> Bound | None:
        bound, self._bound = self._bound, None
        self.breaker.detach()
        if bound is not None:
            bound.unhook()
        return bound

    # -- manual control -------------------------------------------------------------------------

    async def execute(
        self, session: Any, statement: Any, timeout: int | None = None
    ) -> Result[Any]:
        """Run `statement` through `session`, caching it whatever ops and None entries say.

        The bypass rules (locks, streaming, uncommitted writes, ...) still apply.
        """
        options = force_options(self.instance_id, timeout)
        result = session.execute(statement, execution_options=options)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def execute_sync(
        self, session: Session, statement: Any, timeout: int | None = None
    ) -> Result[Any]:
        """`execute()` for a sync `Session`."""
        return session.execute(
            statement, execution_options=force_options(self.instance_id, timeout)
        )

    async def invalidate(
        self, model: Any = None, pks: Iterable[Any] | Any = None, *, unknown_tables: bool = False
    ) -> None:
        """Make stale what reads `model` (a model, Table, dotted class path or table name).

        With `pks` (a list of scalars or of tuples in primary-key order, or one scalar), those
        rows' `get` entries and every multi-row entry of the table; without, the whole table.
        `pks=[]` does nothing; `invalidate()` and `invalidate(None)` are `invalidate_all()`, as
        in upstream 0.1.x. Raises `TransportError` if the backend is down (the invalidation
        stays queued and is delivered when it answers). `unknown_tables=True` accepts a table
        name no imported model maps (the command line uses it).
        """
        if model is None:
            check_invalidate_all_call(pks)
            await self.invalidate_all()
            return
        keys = None if pks is None else pks_list(pks)
        tables, rows = invalidation_targets(model, keys, unknown_tables)
        if tables:
            await greenlet_spawn(self._invalidate_known, tables, rows, keys)

    def invalidate_sync(
        self, model: Any = None, pks: Iterable[Any] | Any = None, *, unknown_tables: bool = False
    ) -> None:
        """`invalidate()` from synchronous code."""
        if model is None:
            check_invalidate_all_call(pks)
            self.invalidate_all_sync()
            return
        keys = None if pks is None else pks_list(pks)
        tables, rows = invalidation_targets(model, keys, unknown_tables)
        if tables:
            self._invalidate_known(tables, rows, keys)

    def get_model_config(self, model: Any) -> dict[str, Any] | None:
        """What the configuration says about a mapped class: {"ops", "timeout", "lock"}, or
        None when it is not cached (as upstream 0.1.x). Resolves dotted paths (imports)."""
        return self.config.model_config(model)

    def is_enabled(self, model: Any, op: str) -> bool:
        """Whether `op` ("get", "fetch", "count", "exists") is cached for `model`."""
        return self.config.is_enabled(model, op)

    def _invalidate_known(
        self, tables: list[Any], rows: list[str] | None, keys: list[Any] | None
    ) -> None:
        bound = self._parts()
        bound.invalidator.invalidate_known(bound.runtime.databases.identities(), tables, rows, keys)

    async def invalidate_all(self) -> None:
        """Make stale everything this prefix stored (a new epoch), and delete its entries."""
        if self._bound is not None:  # entries being written land before the namespace is cleared
            await self._bound.runtime.background.drain()
        await greenlet_spawn(self.invalidate_all_sync)

    def invalidate_all_sync(self) -> None:
        """`invalidate_all()` from synchronous code."""
        self._parts().invalidator.invalidate_everything()

    async def flush_pending(self) -> None:
        """Wait for entries still being written, and deliver queued invalidations now if the
        backend answers."""
        if self._bound is not None:
            await self._bound.flush_pending()

    # -- observability --------------------------------------------------------------------------

    async def namespace_stats(self) -> dict[str, Any]:
        """What the backend holds under this prefix (for operators; scans the keyspace)."""
        return await greenlet_spawn(self.namespace_stats_sync)

    def namespace_stats_sync(self) -> dict[str, Any]:
        """`namespace_stats()` from synchronous code (the command line)."""
        store = self._parts().runtime.store
        try:
            return namespace_stats(
                store, self.namespace, self.config.prefix, self.config.backend.display
            )
        except CacheUnavailable as exc:
            raise TransportError(f"cache backend unreachable: {exc}") from None

    def stats(self) -> dict[str, Any]:
        """Counters per model and op, invalidations, errors, the circuit breaker and the backend."""
        return self.counters.report(self.config, self.breaker, self._bound)
