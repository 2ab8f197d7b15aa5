"""The public cache object: `configure()` returns a `CacheManager`; `bind()` wires it to engines.

The manager holds the configuration, the bindings and the public methods. What a bound cache is
made of is assembled by `binding.Bound` at the first bind and dropped by `disconnect()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine, Result
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from ._greenlet import greenlet_spawn
from .backends.cluster import check_config as check_cluster_mode
from .binding import Bound
from .config import CacheConfig, check_invalidate_all_call, pks_list
from .database import Database, database_identity
from .decision import FORCE_OPTION
from .errors import CacheUnavailable, ConfigError, TransportError
from .invalidation import invalidation_targets
from .keys import Namespace
from .resilience import Breaker
from .stats import HitHook, InvalidateHook, MismatchHook, Stats, namespace_stats

logger = logging.getLogger("sqlacache")
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
        self.counters.on_hit = on_hit
        self.counters.on_miss = on_miss
        self.counters.on_invalidate = on_invalidate
        self.counters.on_mismatch = on_mismatch
        self.breaker = Breaker(
            config.breaker_threshold, config.breaker_probe_interval, self.counters
        )
        self._bound: Bound | None = None

    # -- hooks (assignable, as upstream's users do) ---------------------------------------------

    @property
    def on_hit(self) -> HitHook | None:
        return self.counters.on_hit

    @on_hit.setter
    def on_hit(self, hook: HitHook | None) -> None:
        self.counters.on_hit = hook

    @property
    def on_miss(self) -> HitHook | None:
        return self.counters.on_miss

    @on_miss.setter
    def on_miss(self, hook: HitHook | None) -> None:
        self.counters.on_miss = hook

    @property
    def on_invalidate(self) -> InvalidateHook | None:
        return self.counters.on_invalidate

    @on_invalidate.setter
    def on_invalidate(self, hook: InvalidateHook | None) -> None:
        self.counters.on_invalidate = hook

    @property
    def on_mismatch(self) -> MismatchHook | None:
        """Called as `on_mismatch(model, op, key)` when a verified hit differs from the database."""
        return self.counters.on_mismatch

    @on_mismatch.setter
    def on_mismatch(self, hook: MismatchHook | None) -> None:
        self.counters.on_mismatch = hook

    # -- binding --------------------------------------------------------------------------------

    async def bind(self, engine: AsyncEngine | Engine, database_id: str | None = None) -> None:
        """Cache the ORM sessions of `engine`. May be called for several engines.

        Raises `ConfigError` if Redis answers that the configuration is wrong (a bad password, a
        database number out of range, an ACL denial); an unreachable Redis is an outage, not an
        error: the cache starts closed and the database serves meanwhile.
        """
        sync_engine = self._hook_engine(engine, database_id)
        if sync_engine is not None:
            await greenlet_spawn(self._register_database, sync_engine)

    def bind_sync(self, engine: Engine | AsyncEngine, database_id: str | None = None) -> None:
        """`bind()` for a sync `Engine` and `Session`; same configuration and guarantees."""
        sync_engine = self._hook_engine(engine, database_id)
        if sync_engine is not None:
            self._register_database(sync_engine)

    def _hook_engine(self, engine: AsyncEngine | Engine, database_id: str | None) -> Engine | None:
        """Install the listeners for `engine`; return its sync engine, or None if bound already."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not isinstance(sync_engine, Engine):
            raise ConfigError(f"bind() takes an AsyncEngine or Engine, got {type(engine).__name__}")
        if database_id is not None and (not isinstance(database_id, str) or not database_id):
            raise ConfigError(f"database_id must be a non-empty string, got {database_id!r}")
        self.config.resolve_imports()
        bound = self._parts()
        databases = bound.runtime.databases
        if sync_engine in databases or databases.for_pool(sync_engine.pool):
            return None  # bound already (or an engine sharing its pool, from execution_options)
        identity = database_id or database_identity(sync_engine)
        database = Database(sync_engine, identity, self.config.volatile_functions)
        databases.add(database, bound.tracker.listen_engine(sync_engine))
        return sync_engine

    def _parts(self) -> Bound:
        if self._bound is None:
            self._bound = Bound(
                self.config, self.namespace, self.counters, self.breaker, self.instance_id
            )
        return self._bound

    def _register_database(self, engine: Engine) -> None:
        """Record the database identity in the backend (for the command line) and open a few
        connections. Redis may be down: failures only feed the circuit breaker, which logs once
        per outage. A refusal that names a wrong setting unbinds the engine and raises."""
        bound = self._parts()
        databases, store = bound.runtime.databases, bound.runtime.store
        database = databases.for_pool(engine.pool)
        assert database is not None
        try:
            check_cluster_mode(store.raw)  # outside the breaker: a mistake must reach the caller
            store.warm_up()
            bound.recovery.check_server(store.server_id())
            store.add_member(self.namespace.databases_key, database.identity)
        except ConfigError:
            databases.remove(engine)  # not bound: the caller must fix the configuration
            raise
        except CacheUnavailable as exc:
            cause = exc.__cause__
            problem = None if cause is None else self.breaker.misconfiguration(cause)
            if problem is not None:
                databases.remove(engine)
                raise ConfigError(problem) from cause

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
        self.breaker.stop()
        self.breaker.recover = None
        self.breaker.urgent = lambda: False
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
        result = session.execute(statement, execution_options=self._force_options(timeout))
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def execute_sync(
        self, session: Session, statement: Any, timeout: int | None = None
    ) -> Result[Any]:
        """`execute()` for a sync `Session`."""
        return session.execute(statement, execution_options=self._force_options(timeout))

    def _force_options(self, timeout: int | None) -> dict[str, Any]:
        options: dict[str, Any] = {FORCE_OPTION: self.instance_id}
        if timeout is not None:
            options["cache_timeout"] = timeout
        return options

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
            await greenlet_spawn(self._deliver_invalidation, tables, rows, keys)

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
            self._deliver_invalidation(tables, rows, keys)

    def get_model_config(self, model: Any) -> dict[str, Any] | None:
        """What the configuration says about a mapped class: {"ops", "timeout", "lock"}, or
        None when it is not cached (as upstream 0.1.x). Resolves dotted paths (imports)."""
        return self.config.model_config(model)

    def is_enabled(self, model: Any, op: str) -> bool:
        """Whether `op` ("get", "fetch", "count", "exists") is cached for `model`."""
        return self.config.is_enabled(model, op)

    def _deliver_invalidation(
        self, tables: list[Any], rows: list[str] | None, keys: list[Any] | None
    ) -> None:
        bound = self._parts()
        known = set(bound.runtime.databases.identities())
        with contextlib.suppress(CacheUnavailable):  # databases other processes registered
            known.update(bound.runtime.store.members(self.namespace.databases_key))
        raw = None if keys is None else {k if isinstance(k, tuple) else (k,) for k in keys}
        if not bound.invalidator.invalidate_tables(known, tables, rows, raw):
            raise TransportError("cache backend unreachable; the invalidation is queued")

    async def invalidate_all(self) -> None:
        """Make stale everything this prefix stored (a new epoch), and delete its entries."""
        if self._bound is not None:  # entries being written land before the namespace is cleared
            await self._bound.runtime.background.drain()
        await greenlet_spawn(self.invalidate_all_sync)

    def invalidate_all_sync(self) -> None:
        """`invalidate_all()` from synchronous code."""
        bound = self._parts()
        try:
            bound.invalidator.invalidate_all()
        except CacheUnavailable:
            raise TransportError("cache backend unreachable; invalidate_all is queued") from None
        # the epoch has moved: entries left behind can never validate, and expire by TTL
        with contextlib.suppress(CacheUnavailable):
            bound.runtime.store.delete_entries(self.namespace.entry_prefix)

    async def flush_pending(self) -> None:
        """Wait for entries still being written, and deliver queued invalidations now if the
        backend answers."""
        if self._bound is None:
            return
        await self._bound.runtime.background.drain()
        if self._bound.bridge is not None:  # cashews tags an outage kept
            await self._bound.bridge.redeliver()
        if self._bound.invalidator.pending:
            try:
                await greenlet_spawn(self._bound.recovery)
            except Exception:
                return  # still unreachable: the breaker's probe keeps trying
            self.breaker.close()

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
        bound = self._bound
        extra: dict[str, Any] = {}
        if bound is not None and bound.local_tier is not None:
            extra["local"] = bound.local_tier.stats()
        if bound is not None and bound.bridge is not None:
            extra["cashews"] = bound.bridge.stats()
        return extra | self.counters.report(
            backend=self.config.backend,
            config_error=self.breaker.config_error,
            prefix=self.config.prefix,
            breaker=self.breaker,
            pending=bound.invalidator.pending if bound is not None else 0,
            databases=bound.runtime.databases.identities() if bound is not None else [],
        )
