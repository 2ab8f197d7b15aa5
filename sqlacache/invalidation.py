"""Invalidation: turning what a transaction wrote into version bumps and write leases.

Three moments (SPEC C6): at the first flush or DML that writes a table, its versions are bumped
and a lease is taken (nobody fills entries reading it meanwhile); after COMMIT everything written
is bumped again and the leases released; on rollback the leases are released. A delivery that
fails is queued per table and redelivered before this process serves from the cache again (F3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._greenlet import await_, in_greenlet
from .config import CacheConfig
from .errors import CacheUnavailable
from .keys import WRITTEN_ROW_TTL_MS, Namespace, new_token
from .resilience import Breaker, Guard
from .stats import Stats
from .store import Bump, Store

if TYPE_CHECKING:
    from .cashews_bridge import CashewsBridge
    from .local_tier import LocalTier

logger = logging.getLogger("sqlacache")


@dataclass
class WriteSet:
    """What a (sub)transaction wrote, by table name (after schema translation)."""

    tables: set[str] = field(default_factory=set)  # DML ran: multi-row entries are stale
    table_wide: set[str] = field(default_factory=set)  # rows unknown: `get` entries are stale too
    rows: dict[str, set[str]] = field(default_factory=dict)  # table -> primary-key texts
    #: [cashews bridge] table -> primary keys as the values themselves (cashews tags use str())
    raw_rows: dict[str, set[tuple[Any, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tables or self.table_wide or self.rows)

    def add_row(self, table: str, pk: str) -> None:
        self.rows.setdefault(table, set()).add(pk)

    def merge(self, other: WriteSet) -> None:
        self.tables |= other.tables
        self.table_wide |= other.table_wide
        for table, pks in other.rows.items():
            self.rows.setdefault(table, set()).update(pks)
        for table, raw in other.raw_rows.items():
            self.raw_rows.setdefault(table, set()).update(raw)

    def minus(self, other: WriteSet) -> WriteSet:
        """What this set holds that `other` does not (for incremental flush-time bumps)."""
        rows = {}
        for table, pks in self.rows.items():
            new = pks - other.rows.get(table, set())
            if new:
                rows[table] = new
        return WriteSet(self.tables - other.tables, self.table_wide - other.table_wide, rows)

    def all_tables(self) -> set[str]:
        return self.tables | self.table_wide | set(self.rows)


class Invalidator:
    """Delivers invalidations for every bound database of one cache."""

    def __init__(
        self, namespace: Namespace, store: Store, guard: Guard, config: CacheConfig, stats: Stats
    ) -> None:
        self.ns = namespace
        self.store = store
        self.guard = guard
        self.stats = stats
        # A row version created by a write only has to outlive the entries already depending on
        # it, and those raised its TTL when they were stored (SPEC S3): a short life is enough.
        # Once it expires, the next fill re-creates it, guarded by the table version.
        self.row_ttl_ms = WRITTEN_ROW_TTL_MS
        self.lease_ttl_ms = int(config.lease_timeout * 1000)
        self.max_pending = config.max_pending_tables
        self._pending: dict[tuple[str, str], None] = {}
        self._pending_epoch = False
        #: lease keys whose release was lost (one entry per hold); they block fills until
        #: released, so they ride along with the next delivery
        self._pending_releases: list[str] = []
        #: runs a coroutine as a task the manager tracks (set when the store is asynchronous)
        self.spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Future[Any]] | None = None
        #: [local tier] told of every bump this process sends, before the caller goes on
        self.local: LocalTier | None = None
        #: [cashews bridge] evicts the application's cashews tags after every commit
        self.bridge: CashewsBridge | None = None

    @property
    def breaker(self) -> Breaker:
        return self.guard.breaker

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
        own work (the COMMIT, typically); the caller hands the returned future to `complete`,
        which must not overtake it (a lease released before it is taken would stay for its TTL).
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
            if self.bridge is not None:  # [cashews bridge]
                from .cashews_bridge import tags_of

                self.bridge.keep(tags_of(writes.all_tables(), writes.raw_rows))
            raise
        delivered = self._deliver(db, bump, tables, bump.release)
        if self.bridge is not None:  # [cashews bridge]
            from .cashews_bridge import tags_of

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
            # flight (SPEC F4): whether it landed is unknown, so it is sent again from a task of
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
        store: Any = self.store
        token = new_token()
        mark = self.local.mark() if self.local is not None else None  # [local tier]
        try:
            await self.guard.run_async(
                lambda: store.bump_async(bump, token, self.row_ttl_ms, self.lease_ttl_ms)
            )
        except CacheUnavailable:
            self._bumped(mark, None, bump)  # [local tier] outcome unknown
            self._keep(db, tables, list(releases), urgent)
            return
        except BaseException:
            self._bumped(mark, None, bump)
            raise
        self._bumped(mark, token, bump)

    def send(self, bump: Bump) -> None:
        """One bump, now, under the breaker; this process's tier learns it before returning."""
        token = new_token()
        mark = self.local.mark() if self.local is not None else None  # [local tier]
        try:
            self.guard(self.store.bump, bump, token, self.row_ttl_ms, self.lease_ttl_ms)
        except BaseException:
            self._bumped(mark, None, bump)  # [local tier] it may or may not have landed
            raise
        self._bumped(mark, token, bump)

    def _bumped(self, mark: Any, token: bytes | None, bump: Bump) -> None:
        """[local tier] apply locally what this process bumped (before commit() returns)."""
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
