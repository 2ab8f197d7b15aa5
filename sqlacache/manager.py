"""The public cache object: `configure()` returns a `CacheManager`; `bind()` wires it to engines.

The manager owns one store, one circuit breaker, the invalidator and the listeners; it delegates the
read path to `hooks.ReadPath` and write tracking to `tracking.WriteTracker`. Everything it installs
is removed by `disconnect()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine, Result
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.pool import Pool

from ._greenlet import greenlet_spawn
from .analysis import MAPPERS
from .cashews_bridge import CashewsBridge
from .config import CacheConfig, _import_class
from .database import Database, database_identity
from .errors import CacheUnavailable, ConfigError, TransportError
from .hooks import FORCE_OPTION, ReadPath
from .invalidation import Invalidator, WriteSet
from .keys import Namespace, UnstableValue, new_token, pk_text
from .local_tier import LocalTier, wire
from .resilience import Breaker, Guard
from .serialize import Serializer
from .stats import HitHook, InvalidateHook, Stats
from .store import Fill, Store, make_store
from .tracking import WriteTracker, cascade_targets

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
    ) -> None:
        self.config = config
        self.instance_id = next(_instances)
        self.namespace = Namespace(config.prefix)
        self.counters = Stats()
        self.counters.on_hit = on_hit
        self.counters.on_miss = on_miss
        self.counters.on_invalidate = on_invalidate
        self.serializer = Serializer(config.serializer, config.compress, config.secret)
        self.breaker = Breaker(
            config.breaker_threshold, config.breaker_probe_interval, self.counters
        )
        self.guard = Guard(self.breaker)
        self._store: Store | None = None
        self._invalidator: Invalidator | None = None
        self._tracker: WriteTracker | None = None
        self._read_path: ReadPath | None = None
        self._databases: dict[Pool, Database] = {}
        self._global_listeners = False
        self._server_id: str | None = None
        self._background: set[asyncio.Task[None]] = set()
        # [local tier / cashews bridge] created with the store by local_tier.wire
        self.local_tier: LocalTier | None = None
        self.bridge: CashewsBridge | None = None
        self.tag_listener: LocalTier | None = None

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

    # -- components (created at first bind: configure() connects to nothing) ---------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = make_store(self.config.backend, self.config.operation_timeout)
            self._invalidator = Invalidator(
                self.namespace, self._store, self.guard, self.config, self.counters
            )
            self.breaker.recover = self._recover
            if self._store.shared:
                self._invalidator.spawn = self._spawn
            wire(self)  # [local tier / cashews bridge]
        return self._store

    @property
    def invalidator(self) -> Invalidator:
        self.store  # noqa: B018 - creates the invalidator with the store
        assert self._invalidator is not None
        return self._invalidator

    @property
    def tracker(self) -> WriteTracker:
        if self._tracker is None:
            self._tracker = WriteTracker(self.invalidator, self.database_for)
        return self._tracker

    @property
    def read_path(self) -> ReadPath:
        if self._read_path is None:
            self._read_path = ReadPath(self)
        return self._read_path

    def database_for_pool(self, pool: Pool) -> Database | None:
        return self._databases.get(pool)

    def database_for(self, connection: Any) -> Database | None:
        engine = (
            connection if isinstance(connection, Engine) else getattr(connection, "engine", None)
        )
        return None if engine is None else self._databases.get(engine.pool)

    # -- binding --------------------------------------------------------------------------------

    async def bind(self, engine: AsyncEngine | Engine, database_id: str | None = None) -> None:
        """Cache the ORM sessions of `engine`. May be called for several engines."""
        identity = self._hook_engine(engine, database_id)
        if identity is not None:
            await greenlet_spawn(self._register_database, identity)

    def bind_sync(self, engine: Engine | AsyncEngine, database_id: str | None = None) -> None:
        """`bind()` for a sync `Engine` and `Session` (SPEC §7); same configuration and guarantees."""
        identity = self._hook_engine(engine, database_id)
        if identity is not None:
            self._register_database(identity)

    def _hook_engine(self, engine: AsyncEngine | Engine, database_id: str | None) -> str | None:
        """Install the listeners for `engine`; return its identity, or None if already bound."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not isinstance(sync_engine, Engine):
            raise ConfigError(f"bind() takes an AsyncEngine or Engine, got {type(engine).__name__}")
        if database_id is not None and (not isinstance(database_id, str) or not database_id):
            raise ConfigError(f"database_id must be a non-empty string, got {database_id!r}")
        self.config.resolve_imports()
        self.store  # noqa: B018 - the store exists from the first bind on
        if sync_engine.pool in self._databases:
            return None
        identity = database_id or database_identity(sync_engine)
        self._databases[sync_engine.pool] = Database(
            sync_engine, identity, self.config.volatile_functions
        )
        self.tracker.listen_engine(sync_engine)
        if not self._global_listeners:
            event.listen(Session, "do_orm_execute", self.read_path.on_execute, retval=True)
            self.tracker.listen_globally()
            self._global_listeners = True
        return identity

    def _register_database(self, identity: str) -> None:
        """Record the database identity in the backend (for the command line) and open a few
        connections. Redis may be down (F1): failures only feed the circuit breaker, which logs
        once per outage."""
        with contextlib.suppress(CacheUnavailable):
            self.guard(self.store.warm_up)
            self._check_server(self.guard(self.store.server_id))
            self.guard(self.store.add_member, self.namespace.databases_key, identity)

    async def disconnect(self) -> None:
        """Remove every listener and close the backend; sessions keep working, uncached."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        store = self._unhook()
        if store is not None:
            with contextlib.suppress(Exception):
                aclose = getattr(store, "aclose", None)
                if aclose is not None:
                    await aclose()
                else:
                    store.close()

    def disconnect_sync(self) -> None:
        """`disconnect()` from synchronous code."""
        store = self._unhook()
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def _unhook(self) -> Store | None:
        if self._global_listeners:
            if event.contains(Session, "do_orm_execute", self.read_path.on_execute):
                event.remove(Session, "do_orm_execute", self.read_path.on_execute)
            self._global_listeners = False
        if self._tracker is not None:
            self._tracker.unlisten()
        self.breaker.stop()
        for tier in (self.local_tier, self.tag_listener):  # [local tier]
            if tier is not None:
                tier.stop()
        self.local_tier = self.tag_listener = None
        for database in self._databases.values():
            database.plans.clear()
        self._databases.clear()
        store, self._store = self._store, None
        self._invalidator = None
        self._tracker = None
        self._read_path = None
        return store

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
        self, target: Any, pks: Iterable[Any] | None = None, *, unknown_tables: bool = False
    ) -> None:
        """Make stale what reads `target` (a model, Table, dotted class path or table name).

        With `pks`, those rows' `get` entries and every multi-row entry of the table; without,
        the whole table. `pks=[]` does nothing. Raises `TransportError` if the backend is down
        (the invalidation stays queued and is delivered when it answers). `unknown_tables=True`
        accepts a table name no imported model maps (the command line uses it).
        """
        pks = None if pks is None else list(pks)
        tables, rows = self._invalidation_targets(target, pks, unknown_tables)
        if tables:
            await greenlet_spawn(self._deliver_invalidation, tables, rows, _raw(pks))

    def invalidate_sync(
        self, target: Any, pks: Iterable[Any] | None = None, *, unknown_tables: bool = False
    ) -> None:
        """`invalidate()` from synchronous code."""
        pks = None if pks is None else list(pks)
        tables, rows = self._invalidation_targets(target, pks, unknown_tables)
        if tables:
            self._deliver_invalidation(tables, rows, _raw(pks))

    def _invalidation_targets(
        self, target: Any, pks: Iterable[Any] | None, unknown_tables: bool
    ) -> tuple[list[Table | str], list[str] | None]:
        """The tables and row identities to invalidate; no tables when `pks` is empty."""
        try:
            tables: list[Table | str] = list(self._tables_of(target))
        except ConfigError:
            if not (unknown_tables and isinstance(target, str)):
                raise
            tables = [target]
        rows: list[str] | None = None
        if pks is not None:
            try:
                rows = [pk_text(pk if isinstance(pk, tuple) else (pk,)) for pk in pks]
            except UnstableValue:
                raise ConfigError(
                    f"pks must be scalars or tuples of scalars, got {pks!r}"
                ) from None
            if not rows:
                return [], None
        return tables, rows

    def _deliver_invalidation(
        self,
        tables: list[Table | str],
        rows: list[str] | None,
        raw: set[tuple[Any, ...]] | None = None,
    ) -> None:
        databases = set(self._known_databases())
        delivered = True
        for db in sorted(databases):
            writes = WriteSet()
            for table in tables:
                name = table if isinstance(table, str) else table.fullname
                writes.tables.add(name)
                if rows is None:
                    writes.table_wide.add(name)
                else:
                    for pk in rows:
                        writes.add_row(name, pk)
                    if raw:  # [cashews bridge] the tags name rows by their values
                        writes.raw_rows[name] = set(raw)
                if isinstance(table, str):
                    continue
                for child in {
                    *cascade_targets(table, "delete", None),
                    *cascade_targets(table, "update", None),
                }:
                    writes.tables.add(child.fullname)
                    writes.table_wide.add(child.fullname)
            delivered = self.invalidator.complete(db, writes, ()) and delivered
        if not delivered:
            raise TransportError("cache backend unreachable; the invalidation is queued")

    def _known_databases(self) -> list[str]:
        known = {db.identity for db in self._databases.values()}
        with contextlib.suppress(CacheUnavailable):
            known.update(self.guard(self.store.members, self.namespace.databases_key))
        return sorted(known)

    async def invalidate_all(self) -> None:
        """Make stale everything this prefix stored (a new epoch), and delete its entries."""
        if self._background:  # entries being written land before the namespace is cleared
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await greenlet_spawn(self.invalidate_all_sync)

    def invalidate_all_sync(self) -> None:
        """`invalidate_all()` from synchronous code."""
        try:
            self.invalidator.invalidate_all()
        except CacheUnavailable:
            raise TransportError("cache backend unreachable; invalidate_all is queued") from None
        # the epoch has moved: entries left behind can never validate, and expire by TTL
        with contextlib.suppress(CacheUnavailable):
            self.guard(self.store.delete_entries, self.namespace.entry_prefix)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` as a task of its own, awaited by `flush_pending()` and `disconnect()`."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def store_in_background(
        self, fill: Fill, model_name: str, op: str, prepare: Callable[[], bool]
    ) -> None:
        """Write a filled entry without making the reader wait for the round trip (SPEC P4).

        Readers in this process that arrive before it lands are served by the finished miss
        (see `stampede`); other processes simply miss until then.
        """
        self._spawn(self._store_task(fill, model_name, op, prepare))

    async def _store_task(
        self, fill: Fill, model_name: str, op: str, prepare: Callable[[], bool]
    ) -> None:
        if not prepare():  # serialise (CPU) while the request goes on
            return
        store: Any = self.store
        try:
            await self.guard.run_async(lambda: store.store_async(fill))
        except CacheUnavailable:
            self.counters.error(model_name, op)
            return
        self.counters.stored(model_name, op)

    async def flush_pending(self) -> None:
        """Wait for entries still being written, and deliver queued invalidations now if the
        backend answers."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self.bridge is not None:  # [cashews bridge]
            await self.bridge.redeliver()
        if self._invalidator is not None and self._invalidator.pending:
            try:
                await greenlet_spawn(self._recover)
            except Exception:
                return  # still unreachable: the breaker's probe keeps trying
            self.breaker.close()

    def _tables_of(self, target: Any) -> list[Table]:
        if isinstance(target, Table):
            return [target]
        if isinstance(target, Mapper):
            return [t for t in target.tables if isinstance(t, Table)]
        if isinstance(target, type):
            info: Any = sa_inspect(target, raiseerr=False)
            if info is None or not isinstance(getattr(info, "mapper", None), Mapper):
                raise ConfigError(f"{target.__qualname__} is not a mapped class")
            return [t for t in info.mapper.tables if isinstance(t, Table)]
        if isinstance(target, str):
            for table in _all_tables():
                if table.fullname == target or table.name == target:
                    return [table]
            if "." in target:
                try:
                    return self._tables_of(_import_class(target))
                except ConfigError:
                    pass
            raise ConfigError(f"unknown model or table {target!r}")
        raise ConfigError(f"invalidate() takes a model, Table or name, got {target!r}")

    # -- recovery (called by the circuit breaker) -----------------------------------------------

    def _recover(self) -> None:
        """Called by the circuit breaker: succeed only when the backend answers and every queued
        invalidation has been delivered; raise otherwise."""
        store = self.store
        store.ping()
        self._check_server(store.server_id())
        invalidator = self.invalidator
        invalidator.redeliver(
            lambda bump: store.bump(
                bump, new_token(), invalidator.row_ttl_ms, invalidator.lease_ttl_ms
            )
        )
        if self.local_tier is not None:  # [local tier] what was redelivered is unknown here
            self.local_tier.mirror.drop_tokens()
        for database in list(self._databases.values()):  # the registry may have been lost
            store.add_member(self.namespace.databases_key, database.identity)

    def _check_server(self, server_id: str | None) -> None:
        """A backend that restarted may have come back from an old snapshot, whose version keys
        would validate stale entries: move the namespace to a new epoch."""
        if server_id is None:
            return
        if self._server_id is not None and server_id != self._server_id:
            logger.warning("sqlacache: the cache backend restarted; every entry is made stale")
            self.invalidator.queue_epoch()
        self._server_id = server_id

    # -- observability --------------------------------------------------------------------------

    async def namespace_stats(self) -> dict[str, Any]:
        """What the backend holds under this prefix (for operators; scans the keyspace)."""
        return await greenlet_spawn(self._namespace_stats)

    def _namespace_stats(self) -> dict[str, Any]:
        ns, store = self.namespace, self.store

        def count(prefix: str) -> int:
            return self.guard(store.count_keys, prefix)

        try:
            return {
                "prefix": self.config.prefix,
                "backend": self.config.backend.url,
                "entries": count(ns.entry_prefix),
                "table_versions": count(ns.meta_prefix + "v:"),
                "table_wide_versions": count(ns.meta_prefix + "b:"),
                "row_versions": count(ns.meta_prefix + "r:"),
                "write_leases": count(ns.meta_prefix + "l:"),
                "databases": self.guard(store.members, ns.databases_key),
                "note": "per-process hit/miss counters live in each process: see cache.stats()",
            }
        except CacheUnavailable as exc:
            raise TransportError(f"cache backend unreachable: {exc}") from None

    def stats(self) -> dict[str, Any]:
        """Counters per model and op, invalidations, errors, the circuit breaker and the backend."""
        data = self.counters.as_dict()
        backend = self.config.backend
        data["backend"] = {
            "scheme": backend.scheme,
            "shared_between_processes": not backend.is_memory,
            "note": (
                "mem:// is per process: a write in one worker does not evict another worker's entries"
                if backend.is_memory
                else "shared by every process using this Redis and prefix"
            ),
        }
        data["prefix"] = self.config.prefix
        data["circuit_breaker"] = {
            "state": self.breaker.state,
            "consecutive_failures": self.breaker.failures,
            "last_error": self.breaker.last_error,
        }
        data["pending_invalidations"] = self._invalidator.pending if self._invalidator else 0
        data["databases"] = sorted(db.identity for db in self._databases.values())
        if self.local_tier is not None:  # [local tier]
            data["local"] = self.local_tier.stats()
        if self.bridge is not None:  # [cashews bridge]
            data["cashews"] = self.bridge.stats()
        return data


def _raw(pks: list[Any] | None) -> set[tuple[Any, ...]] | None:
    """[cashews bridge] primary keys as value tuples (scalars become 1-tuples)."""
    if pks is None:
        return None
    try:
        return {pk if isinstance(pk, tuple) else (pk,) for pk in pks}
    except TypeError:  # unhashable values: only the table tag is deleted
        return None


def _all_tables() -> list[Table]:
    seen: dict[int, Table] = {}
    for mapper in MAPPERS.all_mappers():
        for table in mapper.tables:
            if isinstance(table, Table):
                for other in table.metadata.tables.values():
                    seen.setdefault(id(other), other)
    return list(seen.values())
