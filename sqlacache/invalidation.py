"""Invalidation: turning writes into version bumps and write leases, and delivering them.

Three moments of a transaction: at the first flush or DML that writes a table, its versions are
bumped and a lease is taken (nobody fills entries reading it meanwhile); after COMMIT everything
written is bumped again and the leases released; on rollback the leases are released. Manual
invalidation (`cache.invalidate`, `invalidate_all`) goes through the same delivery. A delivery
that fails is queued per table and redelivered before this process serves from the cache again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from ._greenlet import await_, in_greenlet
from .backends.base import Bump
from .cashews_bridge import tags_of
from .config import CacheConfig
from .errors import CacheUnavailable, ConfigError, TransportError
from .keys import WRITTEN_ROW_TTL_MS, Namespace, UnstableValue, new_token, pk_text
from .mapped import MAPPERS
from .policy import import_class
from .resilience import Breaker, GuardedStore
from .stats import Stats
from .writes import WriteSet, cascade_targets

if TYPE_CHECKING:
    from .cashews_bridge import CashewsBridge
    from .local_tier import LocalTier

logger = logging.getLogger("sqlacache")


class Invalidator:
    """Delivers invalidations for every bound database of one cache."""

    def __init__(
        self,
        namespace: Namespace,
        store: GuardedStore,
        config: CacheConfig,
        stats: Stats,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Future[Any]] | None,
    ) -> None:
        self.ns = namespace
        self.store = store
        self.stats = stats
        # A row version created by a write only has to outlive the entries already depending on
        # it, and those raised its TTL when they were stored: a short life is enough.
        # Once it expires, the next fill re-creates it, guarded by the table version.
        self.row_ttl_ms = WRITTEN_ROW_TTL_MS
        self.lease_ttl_ms = int(config.lease_timeout * 1000)
        self.max_pending = config.max_pending_tables
        self._pending: dict[tuple[str, str], None] = {}
        self._pending_epoch = False
        #: lease keys whose release was lost (one entry per hold); they block fills until
        #: released, so they ride along with the next delivery
        self._pending_releases: list[str] = []
        #: runs a coroutine as a background task (None when the store is in-process)
        self.spawn = spawn
        #: the in-process tier, told of every bump this process sends before the caller goes on
        self.local: LocalTier | None = None
        #: evicts the application's cashews tags after every commit
        self.bridge: CashewsBridge | None = None

    @property
    def breaker(self) -> Breaker:
        return self.store.breaker

    @property
    def pending(self) -> int:
        return len(self._pending) + int(self._pending_epoch)

    # -- the three moments --------------------------------------------------------------------------

    def lease_keys(self, db: str, writes: WriteSet) -> set[str]:
        """The leases a transaction holds while it writes this: per table, per row, table-wide."""
        ns = self.ns
        keys = {ns.lease(db, t) for t in writes.tables | writes.table_wide}
        keys.update(ns.table_wide_lease(db, t) for t in writes.table_wide)
        for table, pks in writes.rows.items():
            keys.update(ns.row_lease(db, table, pk) for pk in pks)
        return keys

    def announce(
        self, db: str, writes: WriteSet, acquire: Iterable[str]
    ) -> asyncio.Future[Any] | None:
        """At flush or DML time: bump what is new and take the leases (keys) not yet held.

        Under asyncio this is sent without waiting, so its round trip overlaps the transaction's
        own work until its COMMIT; the caller hands the returned future to `before_commit`, which
        waits for it, and to `complete`, which must not overtake it either (a lease released
        before it is taken would stay for its TTL).
        """
        bump = self._bump_for(db, writes)
        bump.acquire = list(acquire)
        if not bump:
            return None
        tables = writes.all_tables()
        if self.spawn is not None and in_greenlet():
            return self.spawn(self._deliver_async(db, bump, tables, (), urgent=True))
        self._deliver(db, bump, tables)
        return None

    def before_commit(self, announcements: Iterable[asyncio.Future[Any]]) -> None:
        """Just before COMMIT: the transaction's announcements still in flight land first.

        Once other processes can see the commit in the database, no entry filled before its
        writes may validate any more, and no fill may start until `complete`: a reader that
        finds the new rows in the database must not then be served the old ones from the cache.
        An ORM commit sends COMMIT right after its flush, before the announcement's task has
        even run, so without this wait the announcement would land after the COMMIT. One that
        fails is queued as usual; the COMMIT goes on.
        """
        self._settle(announcements)

    def complete(
        self,
        db: str,
        writes: WriteSet,
        leased: Iterable[str],
        after: Iterable[asyncio.Future[Any]] = (),
    ) -> bool:
        """After COMMIT: bump everything the transaction wrote and release its leases (keys).

        `after`: the transaction's announcements still in flight, which must land first.
        """
        bump = self._bump_for(db, writes)
        bump.release = list(leased)
        tables = writes.all_tables()
        try:
            self._settle(after)
        except asyncio.CancelledError:  # see `_deliver`: the delivery goes on in a task
            self._spawn_delivery(db, bump, tables, bump.release, True, after)
            if self.bridge is not None:
                self.bridge.keep(tags_of(writes.all_tables(), writes.raw_rows))
            raise
        delivered = self._deliver(db, bump, tables, bump.release)
        if self.bridge is not None:
            self.bridge.evict(tags_of(writes.all_tables(), writes.raw_rows))
        for table in sorted(writes.all_tables()):
            pks = (
                sorted(writes.rows[table])
                if table in writes.rows and table not in writes.table_wide
                else None
            )
            self.stats.invalidated(table, pks)
        return delivered

    def release(
        self, db: str, leased: Iterable[str], after: Iterable[asyncio.Future[Any]] = ()
    ) -> None:
        """After ROLLBACK: the writes never happened; only the leases go (after being taken)."""
        keys = list(leased)
        if not keys:
            return
        bump = Bump(release=keys)
        try:
            self._settle(after)
        except asyncio.CancelledError:
            self._spawn_delivery(db, bump, set(), keys, False, after)
            raise
        # a lost release never makes data stale (it only blocks fills): keep it for the next
        # delivery without stopping the cache
        self._deliver(db, bump, set(), keys, urgent=False)

    def _settle(self, announcements: Iterable[asyncio.Future[Any]]) -> None:
        """Wait for announcements still in flight: what follows them must not overtake them."""
        pending = [f for f in announcements if not f.done()]
        if pending and in_greenlet():
            await_(asyncio.shield(asyncio.gather(*pending, return_exceptions=True)))

    def _spawn_delivery(
        self,
        db: str,
        bump: Bump,
        tables: set[str],
        releases: list[str],
        urgent: bool,
        after: Iterable[asyncio.Future[Any]] = (),
    ) -> None:
        if self.spawn is not None:
            self.spawn(self._deliver_async(db, bump, tables, releases, urgent=urgent, after=after))
        else:
            self._keep(db, tables, releases, urgent)

    # -- manual invalidation ----------------------------------------------------------------------

    def invalidate_tables(
        self,
        databases: Iterable[str],
        tables: list[Table | str],
        rows: list[str] | None,
        raw_rows: set[tuple[Any, ...]] | None = None,
    ) -> bool:
        """Make `tables` stale in every database (only `rows` of them, where given), with the
        cascades the write path would apply; False if the delivery was queued."""
        writes = WriteSet()
        for table in tables:
            name = table if isinstance(table, str) else table.fullname
            if rows is None:
                writes.add_table_wide(name)
            else:
                writes.tables.add(name)
                for pk in rows:
                    writes.add_row(name, pk)
                if raw_rows:  # the cashews bridge's tags name rows by their values
                    writes.raw_rows[name] = set(raw_rows)
            if isinstance(table, Table):
                for child in cascade_targets(table, "delete", None):
                    writes.add_table_wide(child.fullname)
                for child in cascade_targets(table, "update", None):
                    writes.add_table_wide(child.fullname)
        delivered = True
        for db in sorted(set(databases)):
            delivered = self.complete(db, writes, ()) and delivered
        return delivered

    def invalidate_known(
        self,
        databases: Iterable[str],
        tables: list[Table | str],
        rows: list[str] | None,
        keys: list[Any] | None,
    ) -> None:
        """`cache.invalidate()`: `invalidate_tables` in `databases` and in those other processes
        registered; raises `TransportError` if the delivery was queued."""
        known = set(databases)
        with contextlib.suppress(CacheUnavailable):  # databases other processes registered
            known.update(self.store.members(self.ns.databases_key))
        raw = None if keys is None else {k if isinstance(k, tuple) else (k,) for k in keys}
        if not self.invalidate_tables(known, tables, rows, raw):
            raise TransportError("cache backend unreachable; the invalidation is queued")

    def invalidate_everything(self) -> None:
        """`cache.invalidate_all()`: a new epoch, then the entries it orphaned deleted; raises
        `TransportError` if the new epoch was queued."""
        try:
            self.invalidate_all()
        except CacheUnavailable:
            raise TransportError("cache backend unreachable; invalidate_all is queued") from None
        # the epoch has moved: entries left behind can never validate, and expire by TTL
        with contextlib.suppress(CacheUnavailable):
            self.store.delete_entries(self.ns.entry_prefix)

    def invalidate_all(self) -> None:
        """Move the namespace to a new epoch: every entry of this prefix stops validating."""
        bump = Bump(persistent=[self.ns.epoch_key])
        try:
            self.send(bump)
        except CacheUnavailable:
            self._pending_epoch = True
            self.stats.undelivered_invalidations += 1
            self.breaker.trip("an invalidation could not be delivered")
            raise
        self.stats.epoch_moves += 1

    # -- delivery and redelivery ------------------------------------------------------------------

    def _bump_for(self, db: str, writes: WriteSet) -> Bump:
        ns = self.ns
        bump = Bump()
        for table in writes.tables | writes.table_wide:
            bump.persistent.append(ns.table_version(db, table))
        for table in writes.table_wide:
            bump.persistent.append(ns.table_wide(db, table))
        for table, pks in writes.rows.items():
            bump.expiring.extend(ns.row_version(db, table, pk) for pk in pks)
        return bump

    def _deliver(
        self,
        db: str,
        bump: Bump,
        tables: set[str],
        releases: Iterable[str] = (),
        *,
        urgent: bool = True,
    ) -> bool:
        """Send one bump; if it fails, keep what it carried. `urgent`: it made data stale."""
        releases = list(releases)
        if self._pending_releases:
            carried, self._pending_releases = self._pending_releases, []
            bump.release.extend(carried)
            releases.extend(carried)
        if not bump:
            return True
        try:
            self.send(bump)
            return True
        except CacheUnavailable:
            self._keep(db, tables, releases, urgent)
            return False
        except asyncio.CancelledError:
            # The task awaiting commit() was cancelled (a client disconnect) while this was in
            # flight: whether it landed is unknown, so it is sent again from a task of
            # our own, which the cancellation cannot reach. Bumping twice is harmless; releasing
            # a lease twice can only end another writer's lease early (its own commit still
            # invalidates), where not releasing it would stop fills for the lease's TTL.
            self._spawn_delivery(db, bump, tables, releases, urgent)
            raise

    async def _deliver_async(
        self,
        db: str,
        bump: Bump,
        tables: set[str],
        releases: Iterable[str],
        *,
        urgent: bool,
        after: Iterable[asyncio.Future[Any]] = (),
    ) -> None:
        """`_deliver` for a task of its own (announcements, and deliveries cut by a cancel)."""
        pending = [f for f in after if not f.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        token = new_token()
        mark = self.local.mark() if self.local is not None else None
        try:
            await self.store.bump_async(bump, token, self.row_ttl_ms, self.lease_ttl_ms)
        except CacheUnavailable:
            self._bumped(mark, None, bump)  # whether it landed is unknown
            self._keep(db, tables, list(releases), urgent)
            return
        except asyncio.CancelledError:
            # Its event loop is ending (asyncio.run() returning, a worker shutting down): whether
            # it landed is unknown, so it is kept, for whichever loop uses the cache next.
            self._bumped(mark, None, bump)
            self._keep(db, tables, list(releases), True)
            raise
        except BaseException:
            self._bumped(mark, None, bump)
            raise
        self._bumped(mark, token, bump)

    def send(self, bump: Bump) -> None:
        """One bump, now, under the breaker; this process's tier learns it before returning."""
        token = new_token()
        mark = self.local.mark() if self.local is not None else None
        try:
            self.store.bump(bump, token, self.row_ttl_ms, self.lease_ttl_ms)
        except BaseException:
            self._bumped(mark, None, bump)  # it may or may not have landed
            raise
        self._bumped(mark, token, bump)

    def _bumped(self, mark: Any, token: bytes | None, bump: Bump) -> None:
        """Apply locally what this process bumped, before commit() returns (see `local_tier`)."""
        if self.local is not None:
            self.local.bumped(mark, token, [*bump.persistent, *bump.expiring])

    def _keep(self, db: str, tables: set[str], releases: list[str], urgent: bool) -> None:
        if urgent or tables:
            self.queue(db, tables, releases)
        else:
            self._pending_releases.extend(releases)

    def queue(self, db: str, tables: Iterable[str], releases: Iterable[str] = ()) -> None:
        """Keep an undelivered invalidation (merged per table) and stop serving until redelivered."""
        for table in tables:
            self._pending[(db, table)] = None
        self._pending_releases.extend(releases)
        if len(self._pending) > self.max_pending:
            self._pending.clear()
            self._pending_epoch = True
        self.stats.undelivered_invalidations += 1
        self.breaker.trip("an invalidation could not be delivered", retry_now=True)

    def queue_epoch(self) -> None:
        """Everything this prefix stored must stop validating (e.g. Redis restarted from a snapshot)."""
        self._pending_epoch = True

    def redeliver(self, send: Callable[[Bump], None]) -> None:
        """Deliver the queue with `send`, until it is empty; raises (keeping it) if `send` fails.

        The queue is taken out before sending: what is queued meanwhile stays queued for the next
        turn instead of being cleared along with what was delivered.
        """
        while self.pending or self._pending_releases:
            tables, epoch = list(self._pending), self._pending_epoch
            releases, self._pending_releases = self._pending_releases, []
            self._pending, self._pending_epoch = {}, False
            bump = Bump(release=list(releases))
            if epoch:
                bump.persistent.append(self.ns.epoch_key)
            else:
                for db, table in tables:
                    bump.persistent.append(self.ns.table_version(db, table))
                    bump.persistent.append(self.ns.table_wide(db, table))
            try:
                send(bump)
            except BaseException:
                self._pending_releases.extend(releases)
                for key in tables:
                    self._pending[key] = None
                self._pending_epoch = self._pending_epoch or epoch
                raise
            if epoch:
                self.stats.epoch_moves += 1
            self.stats.redelivered_invalidations += len(tables) + int(epoch)


# -- what `cache.invalidate(target, pks)` names ---------------------------------------------------


def pks_list(pks: Any) -> list[Any]:
    """`invalidate()`'s `pks` as a list of keys: one scalar (`pks=42`, `pks="a"`) is one key;
    a list, set or other iterable holds keys (scalars, or tuples in primary-key order)."""
    if isinstance(pks, (str, bytes)) or not isinstance(pks, Iterable):
        return [pks]
    if isinstance(pks, Mapping):
        raise ConfigError(f"pks must be a key, or a list of keys, not a mapping: {pks!r}")
    return list(pks)


def check_invalidate_all_call(pks: Any) -> None:
    """`invalidate(None)` means `invalidate_all()`; rows without a model mean nothing."""
    if pks is not None:
        raise ConfigError(
            f"invalidate(pks={pks!r}) needs the model or table the keys belong to: "
            "invalidate(User, pks=[...]); invalidate() alone makes everything stale"
        )


def invalidation_targets(
    target: Any, pks: Iterable[Any] | None, unknown_tables: bool
) -> tuple[list[Table | str], list[str] | None]:
    """The tables and row identities to invalidate; no tables when `pks` is empty."""
    try:
        tables: list[Table | str] = list(tables_of(target))
    except ConfigError:
        if not (unknown_tables and isinstance(target, str)):
            raise
        tables = [target]
    rows: list[str] | None = None
    if pks is not None:
        try:
            rows = [pk_text(pk if isinstance(pk, tuple) else (pk,)) for pk in pks]
        except UnstableValue:
            raise ConfigError(f"pks must be scalars or tuples of scalars, got {pks!r}") from None
        if not rows:
            return [], None
    return tables, rows


def tables_of(target: Any) -> list[Table]:
    """The tables of a model, Table, dotted class path or table name."""
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
                return tables_of(import_class(target))
            except ConfigError:
                pass
        raise ConfigError(f"unknown model or table {target!r}")
    raise ConfigError(f"invalidate() takes a model, Table or name, got {target!r}")


def _all_tables() -> list[Table]:
    seen: dict[int, Table] = {}
    for mapper in MAPPERS.all_mappers():
        for table in mapper.tables:
            if isinstance(table, Table):
                for other in table.metadata.tables.values():
                    seen.setdefault(id(other), other)
    return list(seen.values())
