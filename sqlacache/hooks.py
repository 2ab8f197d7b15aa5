"""The read path: the `do_orm_execute` hook that serves SELECTs from the cache.

    decide (bound? options? plan? policy? session state?) -> key -> one fetch of entry + versions
    -> hit: stamp matches -> thaw into the session
    -> miss: run the query -> freeze -> store under the stamp read *before* the query

A hit is served only if the stamp stored with the entry equals the current version of everything
the statement reads, fetched in the same round trip (SPEC C6). The stamp of a fill is captured
before the query runs, so a write committed meanwhile leaves an entry that never validates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.orm.attributes import instance_state

from ._greenlet import await_, in_greenlet
from .analysis import Plan, coerce_pk
from .config import ModelPolicy, check_timeout
from .database import Database, table_name
from .errors import CacheUnavailable
from .keys import (
    ROW_VERSION_MARGIN_MS,
    UnstableValue,
    canonical,
    digest_base,
    digest_from,
    new_token,
    pk_text,
)
from .serialize import PayloadError, Snapshot, Unserializable
from .snapshot import NotSnapshottable, build_result, enum_resolver, freeze, mapper_name, thaw
from .stampede import Flights
from .store import Fill

if TYPE_CHECKING:
    from .local_tier import LocalTier
    from .manager import CacheManager

logger = logging.getLogger("sqlacache")

FORCE_OPTION = "sqlacache_force"
PLANNED_TOKEN_SECONDS = 10.0


class Bypass(Exception):
    """This read neither uses nor fills the cache; the message is the reason counted in stats."""


@dataclass(frozen=True)
class KeySet:
    """The key names a plan reads in one database under one schema map."""

    names: frozenset[str]  # table names, to compare with what the transaction wrote
    versions: tuple[str, ...]  # epoch, then table versions (or table-wide tokens for `get`)
    leases: tuple[str, ...]  # fetch: table leases; get: table-wide leases, then eager tables'
    row_prefixes: tuple[str, ...]  # get: one row-version key prefix per table of the entity
    row_lease_prefixes: tuple[str, ...]  # get: one row-lease key prefix per table of the entity
    row_guards: tuple[str, ...]  # get: the table version guarding each row version's creation
    entry_base: Any  # the entry digest fed with what is fixed here: statement, database, schema map


class ReadPath:
    """Serves cached reads for one `CacheManager`."""

    def __init__(self, manager: CacheManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.ns = manager.namespace
        self.stats = manager.counters
        self.flights = Flights(wait_timeout=manager.config.lock_timeout)
        self._planned: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    # -- entry point ----------------------------------------------------------------------------

    def on_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        """The `do_orm_execute` listener: a Result to serve, or None to let the ORM run the SQL."""
        if not state.is_select:
            return None
        db = self._database_of(state)
        if db is None:
            return None
        options = state.execution_options
        if options.get("cache") is False or options.get("sqlacache_skip_interceptor"):
            return None
        statement = state.statement
        cache_key = getattr(statement, "_generate_cache_key", _no_key)()
        if cache_key is None:
            return None
        plan = db.plans.plan_for(statement, cache_key)
        model = plan.model
        name = mapper_name(model) if model is not None else "-"
        if plan.bypass is not None:
            self.stats.bypass(name, plan.op, plan.bypass)
            return None
        assert model is not None
        policy = self.config.policy_for(model)
        forced = options.get(FORCE_OPTION) == self.manager.instance_id
        if not forced and not policy.allows(plan.op):
            return None
        try:
            ttl = self._ttl(options, policy)
            self._check_call(state)
            keyset, identity, tracker = self._check_session(state, db, plan, cache_key)
            read = Read(self, state, db, plan, cache_key, keyset, identity, ttl, name, policy)
        except Bypass as reason:
            self.stats.bypass(name, plan.op, str(reason))
            return None
        return read.run(tracker)

    # -- decisions ------------------------------------------------------------------------------

    def _database_of(self, state: ORMExecuteState) -> Database | None:
        bind = state.session.get_bind(**state.bind_arguments)
        engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
        if engine is None:
            return None
        return self.manager.database_for_pool(engine.pool)

    def _ttl(self, options: Mapping[str, Any], policy: ModelPolicy) -> int:
        override = options.get("cache_timeout")
        if override is not None:
            return check_timeout(override, "cache_timeout")
        return policy.timeout if policy.enabled else self.config.default_timeout

    def _check_call(self, state: ORMExecuteState) -> None:
        if state.is_column_load:
            raise Bypass("column_load")
        load_options = state.load_options
        if getattr(load_options, "_sa_top_level_orm_context", None) is not None:
            # an eager loader's statement (selectin, subquery) inside a larger load: its objects'
            # own eager loads are scheduled on that load while rows are processed, so it must run
            # through the ORM; the enclosing statement's entry already holds the whole graph
            raise Bypass("eager_load_statement")
        options = state.execution_options
        if load_options._populate_existing or options.get("populate_existing"):
            raise Bypass("populate_existing")
        if (
            load_options._yield_per
            or options.get("stream_results")
            or options.get("yield_per")
            or options.get("max_row_buffer")
        ):
            raise Bypass("streaming")

    def _check_session(
        self, state: ORMExecuteState, db: Database, plan: Plan, cache_key: Any
    ) -> tuple[KeySet, str, Any]:
        """Read-your-writes, pending edits, isolation; then the key of this call."""
        session = state.session
        bind = session.bind
        connection_options = bind._execution_options if isinstance(bind, Connection) else None
        schema_map = db.schema_map(connection_options, state.execution_options)
        keyset = self._keyset(db, plan, schema_map)
        tracker = session.info.get(self.manager.tracker.key)
        if tracker is not None:
            if tracker.raw_sql:
                raise Bypass("raw_sql")
            if tracker.written and not keyset.names.isdisjoint(tracker.written):
                raise Bypass("own_writes")
            if tracker.reads_a_snapshot:
                raise Bypass("isolation")
        if isinstance(bind, Connection):
            outer = bind.info.get(self.manager.tracker.key)
            if outer is not None and not keyset.names.isdisjoint(outer.merged().all_tables()):
                raise Bypass("own_writes")
        if _has_pending_changes(session):
            pending = _pending_tables(session, schema_map)
            if not keyset.names.isdisjoint(pending):
                raise Bypass("pending_changes")
            if session.autoflush and state.load_options._autoflush:
                session._autoflush()  # as the uncached query would; may write other tables
                tracker = session.info.get(self.manager.tracker.key)
                if tracker is not None and not keyset.names.isdisjoint(tracker.written):
                    raise Bypass("own_writes")
        identity = self._entry_digest(state, keyset, cache_key)
        return keyset, identity, tracker

    def _keyset(self, db: Database, plan: Plan, schema_map: Mapping[Any, Any] | None) -> KeySet:
        schema_text = canonical(schema_map) if schema_map else ""
        memo = (db.identity, schema_text)
        keyset: KeySet | None = plan.keysets.get(memo)
        if keyset is None:
            keyset = self._build_keyset(db, plan, schema_map, schema_text)
            plan.keysets[memo] = keyset
        return keyset

    def _build_keyset(
        self, db: Database, plan: Plan, schema_map: Mapping[Any, Any] | None, schema_text: str
    ) -> KeySet:
        ns, dbid = self.ns, db.identity

        def named(tables: Sequence[Table]) -> list[str]:
            return [table_name(t, schema_map) for t in tables]

        names = named(plan.tables)
        versions = [ns.epoch_key]
        row_prefixes: list[str] = []
        row_lease_prefixes: list[str] = []
        row_guards: list[str] = []
        if plan.op == "get":
            # a get depends on its own row and on table-wide writes, not on other rows
            rows = named(plan.row_tables)
            others = named(plan.other_tables)
            row_prefixes = [ns.row_version(dbid, t, "") for t in rows]
            row_lease_prefixes = [ns.row_lease(dbid, t, "") for t in rows]
            row_guards = [ns.table_version(dbid, t) for t in rows]
            versions += [ns.table_wide(dbid, t) for t in rows]
            versions += [ns.table_version(dbid, t) for t in others]
            leases = [ns.table_wide_lease(dbid, t) for t in rows]
            leases += [ns.lease(dbid, t) for t in others]
        else:
            versions += [ns.table_version(dbid, t) for t in names]
            leases = [ns.lease(dbid, t) for t in names]
        return KeySet(
            names=frozenset(names),
            versions=tuple(versions),
            leases=tuple(leases),
            row_prefixes=tuple(row_prefixes),
            row_lease_prefixes=tuple(row_lease_prefixes),
            row_guards=tuple(row_guards),
            entry_base=digest_base(plan.sql_digest, db.identity, schema_text),
        )

    def _entry_digest(self, state: ORMExecuteState, keyset: KeySet, cache_key: Any) -> str:
        """The entry's name: the keyset's fixed parts, then this call's values and options."""
        load_options = state.load_options
        try:
            values = canonical([bp.effective_value for bp in cache_key.bindparams])
            parameters: Any = state.parameters
            params = canonical(dict(parameters)) if parameters else ""
            context = ""
            if self.config.key_context is not None:
                context = canonical(self.config.key_context(state))
            token = canonical(load_options._identity_token)
        except UnstableValue as exc:
            raise Bypass("unstable_parameter") from exc
        except TypeError as exc:  # executemany parameters are not a SELECT's
            raise Bypass("parameters") from exc
        flags = f"{int(load_options._only_return_tuples)}{int(load_options._invoke_all_eagers)}"
        return digest_from(keyset.entry_base, values, params, token, context, flags)

    # -- helpers used by Read --------------------------------------------------------------------

    def planned_token(self, key: str) -> bytes:
        """The token fills in this process use to create a missing table version or epoch.

        Sharing it is sound because those keys never expire: two fills that both saw the key
        missing both stay valid only if no write created it in between (a write would have set a
        token of its own). Without sharing, the fill whose SET NX loses could never validate. A
        plan is forgotten after a while, in case the key is evicted and re-created meanwhile.
        """
        now = time.monotonic()
        planned = self._planned.get(key)
        if planned is not None and now - planned[1] < PLANNED_TOKEN_SECONDS:
            return planned[0]
        token = new_token()
        self._planned[key] = (token, now)
        self._planned.move_to_end(key)
        while len(self._planned) > 10_000:
            self._planned.popitem(last=False)
        return token

    def row_keys(
        self, state: ORMExecuteState, plan: Plan, keyset: KeySet, bindparams: Any
    ) -> tuple[list[str], list[str]]:
        """A get's row-version keys and row-lease keys, from its primary-key parameters."""
        if not keyset.row_prefixes:
            return [], []
        params: Any = state.parameters or {}
        values = []
        for pk in plan.pk_params:
            if pk.key in params:
                value = params[pk.key]
            elif 0 <= pk.index < len(bindparams):
                value = bindparams[pk.index].effective_value
            else:
                raise Bypass("pk_parameter")
            try:
                values.append(coerce_pk(value, pk.python_type))
            except (TypeError, ValueError) as exc:
                raise Bypass("pk_parameter") from exc
        try:
            text = pk_text(values)
        except UnstableValue as exc:
            raise Bypass("pk_parameter") from exc
        return (
            [prefix + text for prefix in keyset.row_prefixes],
            [prefix + text for prefix in keyset.row_lease_prefixes],
        )


class Read:
    """One cached read, from the fetch to the hit or the fill."""

    def __init__(
        self,
        path: ReadPath,
        state: ORMExecuteState,
        db: Database,
        plan: Plan,
        cache_key: Any,
        keyset: KeySet,
        identity: str,
        ttl: int,
        model_name: str,
        policy: ModelPolicy,
    ) -> None:
        self.path = path
        self.manager = path.manager
        self.stats = path.stats
        self.state = state
        self.db = db
        self.plan = plan
        self.cache_key = cache_key
        self.keyset = keyset
        self._held_lock: tuple[str, bytes] | None = None
        self.guards_seen: list[bytes | None] = []
        self.fetched_at = 0.0
        self.ttl = ttl
        self.name = model_name
        self.policy = policy
        self.entry_key = path.ns.entry(identity)
        self.local_mark: Any = None  # [local tier] the mirror's mark before the fetch
        self.single_entity = (
            bool(plan.shape and plan.shape.single_entity)
            and not state.load_options._only_return_tuples
        )

    def run(self, tracker: Any) -> Result[Any] | None:
        try:
            row_keys, row_leases = self.path.row_keys(
                self.state, self.plan, self.keyset, self.cache_key.bindparams
            )
        except Bypass as reason:
            self.stats.bypass(self.name, self.plan.op, str(reason))
            return None
        version_keys = [*row_keys, *self.keyset.versions]
        lease_keys = [*row_leases, *self.keyset.leases]
        keys = [self.entry_key, *version_keys, *lease_keys, *self.keyset.row_guards]
        # [local tier] a valid decoded entry in this process: no Redis round trip at all
        tier = self.manager.local_tier if self.policy.local else None
        if tier is not None:
            snapshot = tier.lookup(self.entry_key, version_keys, self._decode)
            if snapshot is not None:
                result = self._hit(snapshot, shared=True)
                if result is not None:
                    return result
            self.local_mark = tier.mark()  # before the fetch: see local_tier's docstring
        self.fetched_at = time.monotonic()  # before the stamp is read: see Fill.guard_rows
        try:
            found = self.manager.guard(self.manager.store.fetch, keys)
        except CacheUnavailable:
            self.stats.error(self.name, self.plan.op)
            return None
        entry = found[0]
        end = 1 + len(version_keys)
        versions = found[1:end]
        leases = found[end : end + len(lease_keys)]
        self.guards_seen = found[end + len(lease_keys) :]
        leased = leases.count(None) != len(leases)
        if entry is not None and None not in versions:
            stamp = b",".join(versions)  # type: ignore[arg-type]
            if entry.startswith(stamp) and entry[len(stamp) : len(stamp) + 1] == b"\n":
                payload = entry[len(stamp) + 1 :]
                snapshot = self._decode(payload)
                if snapshot is not None and tier is not None:  # [local tier] keep it decoded
                    tier.remember(
                        self.local_mark, self.entry_key, version_keys, versions,
                        snapshot=snapshot, ttl=self.ttl, size=len(payload),
                    )  # fmt: skip
                result = None if snapshot is None else self._hit(snapshot, shared=tier is not None)
                if result is not None:
                    return result
        self.stats.miss(self.plan.model, self.name, self.plan.op)
        return self._miss(version_keys, versions, leased, tracker)

    # -- hit ------------------------------------------------------------------------------------

    def _serve(self, payload: bytes) -> Result[Any] | None:
        snapshot = self._decode(payload)
        return None if snapshot is None else self._hit(snapshot)

    def _decode(self, payload: bytes) -> Snapshot | None:
        try:
            return self.manager.serializer.loads(payload, enum_resolver(self.plan))
        except PayloadError as exc:
            self._payload_error(exc)
            return None

    def _hit(self, snapshot: Snapshot, *, shared: bool = False) -> Result[Any] | None:
        result = self._from_snapshot(snapshot, shared=shared)
        if result is not None:
            self.stats.hit(self.plan.model, self.name, self.plan.op)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("sqlacache hit %s %s key=%s", self.name, self.plan.op, self.entry_key)
        return result

    def _payload_error(self, exc: Exception) -> None:
        self.stats.payload_errors += 1
        self.stats.log.warning(
            "payload", "sqlacache: discarded an unreadable cache entry (%s)", exc
        )
        with contextlib.suppress(CacheUnavailable):
            self.manager.guard(self.manager.store.delete, self.entry_key)

    # -- miss -----------------------------------------------------------------------------------

    def _miss(
        self, version_keys: list[str], versions: list[bytes | None], leased: bool, tracker: Any
    ) -> Result[Any]:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("sqlacache miss %s %s key=%s", self.name, self.plan.op, self.entry_key)
        fill_allowed = not leased

        flight_key = (self.entry_key, tuple(versions))
        flight = None
        if fill_allowed:
            flight, leader = self.path.flights.lead_or_join(flight_key)
            if not leader:
                # an identical miss (same key, same stamp) is running: use its result
                snapshot = self.path.flights.wait(flight)
                joined = None if snapshot is None else self._from_snapshot(snapshot, shared=True)
                if joined is not None:
                    return joined
                flight = None
            elif self.policy.lock:
                found = self._wait_for_other_process(version_keys)
                if found is not None:
                    self.path.flights.finish(flight_key, flight, found)  # for our followers too
                    joined = self._hit(found, shared=True)
                    if joined is not None:
                        return joined
        snapshot = None
        try:
            result, snapshot = self._query(fill_allowed)
            if snapshot is not None:
                self._store(snapshot, version_keys, versions)
            return result
        finally:
            if flight is not None:
                self.path.flights.finish(flight_key, flight, snapshot)
            if self._held_lock is not None:
                self._release_lock()

    def _query(self, want_snapshot: bool) -> tuple[Result[Any], Any]:
        session = self.state.session
        identity_map = session.identity_map
        pre_existing = set(identity_map.keys()) if len(identity_map) else None
        result = self.state.invoke_statement()
        shape = self.plan.shape
        assert shape is not None
        if shape.requires_unique:
            result = result.unique()
        frozen = result.freeze()
        replay = frozen()
        if shape.requires_unique:
            replay._unique_filter_state = build_result(shape, False, ())._unique_filter_state
        if not want_snapshot:
            return replay, None
        rows = frozen.data
        if len(rows) > self.manager.config.max_rows:
            self.stats.bypass(self.name, self.plan.op, "too_many_rows")
            return replay, None
        try:
            snapshot, missing_tables, new_mappers = freeze(
                rows, shape, self.single_entity, self.plan, pre_existing
            )
        except NotSnapshottable as reason:
            self.stats.bypass(self.name, self.plan.op, str(reason))
            return replay, None
        if missing_tables or new_mappers:
            # the result reached tables the plan did not foresee: learn them, fill next time
            learned = self.plan.with_more(missing_tables, new_mappers)
            self.db.plans.put(self.cache_key.key, learned)
            self.stats.bypass(self.name, self.plan.op, "learned_dependencies")
            return replay, None
        return replay, snapshot

    def _stamp(self, version_keys: list[str], versions: list[bytes | None]) -> tuple[bytes, Fill]:
        """The stamp read before the query; missing versions get a token to initialise.

        A missing row version is created only if its table's version is still the one this read
        saw (see lua/fill.lua); table versions never expire and are created if still missing.
        """
        fill = Fill(
            self.entry_key,
            b"",
            self.ttl * 1000,
            extend_ms=self._row_key_ttl_ms(),
            captured_at=self.fetched_at,
        )
        tokens: list[bytes] = []
        row_count = len(version_keys) - len(self.keyset.versions)
        for position, (key, token) in enumerate(zip(version_keys, versions, strict=True)):
            if position < row_count:
                if token is None:
                    token = new_token()
                    guard = self.keyset.row_guards[position]
                    planned = self.path.planned_token(guard)
                    fill.init_rows.append((key, token, guard, self.guards_seen[position], planned))
                else:
                    fill.extend.append(key)
            elif token is None:
                token = self.path.planned_token(key)
                fill.init.append((key, token, None))
            tokens.append(token)
        return b",".join(tokens), fill

    def _row_key_ttl_ms(self) -> int:
        """Row versions this entry depends on must outlive it; table versions never expire."""
        return self.ttl * 1000 + ROW_VERSION_MARGIN_MS

    def _store(self, snapshot: Any, version_keys: list[str], versions: list[bytes | None]) -> None:
        stamp, fill = self._stamp(version_keys, versions)
        encode = functools.partial(
            encode_entry, self.manager, snapshot, stamp, fill, self.name, self.plan.op
        )
        tier = self.manager.local_tier if self.policy.local else None
        if tier is not None:  # [local tier] keep the fill's payload, decoded on first local use
            encode = functools.partial(
                _remember_fill, encode, tier, self.local_mark, fill, version_keys, versions,
                self.ttl, len(stamp) + 1,
            )  # fmt: skip
        if self.manager.store.shared and in_greenlet() and self._held_lock is None:
            # The reader has its result: serialising and writing overlap the work that follows.
            # (With a cross-process fill lock held, the entry must land before it is released.)
            self.manager.store_in_background(fill, self.name, self.plan.op, encode)
            return
        if not encode():
            return
        try:
            self.manager.guard(self.manager.store.store, fill)
        except CacheUnavailable:
            self.stats.error(self.name, self.plan.op)
            return
        self.stats.stored(self.name, self.plan.op)

    # -- stampede protection (SPEC F5) ----------------------------------------------------------

    def _from_snapshot(self, snapshot: Snapshot, *, shared: bool = False) -> Result[Any] | None:
        """Materialise a snapshot in this read's session (a hit, or a joined in-process miss)."""
        try:
            rows = thaw(
                snapshot,
                self.state.session,
                self.plan,
                self.state.load_options._identity_token,
                shared=shared,
            )
        except PayloadError as exc:
            self._payload_error(exc)
            return None
        assert self.plan.shape is not None
        return build_result(self.plan.shape, self.single_entity, rows)

    def _wait_for_other_process(self, version_keys: list[str]) -> Snapshot | None:
        """With `lock=True`: one process fills, the others poll for its entry (bounded)."""
        manager = self.manager
        lock_key = manager.namespace.fill_lock(self.entry_key)
        token = new_token()
        lock_ms = int(manager.config.lock_timeout * 1000)
        keys = [self.entry_key, *version_keys]
        try:
            if manager.guard(manager.store.try_lock, lock_key, token, lock_ms):
                self._held_lock = (lock_key, token)
                # the previous holder may have stored and released since our first fetch
                found = self._valid_entry(keys)
                if found is not None:
                    self._release_lock()
                return found
        except CacheUnavailable:
            return None
        deadline = time.monotonic() + manager.config.lock_timeout
        delay = 0.01
        while time.monotonic() < deadline:
            if in_greenlet():
                await_(asyncio.sleep(delay))
            else:
                time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
            try:
                found = self._valid_entry(keys)
            except CacheUnavailable:
                return None
            if found is not None:
                return found
        return None

    def _valid_entry(self, keys: list[str]) -> Snapshot | None:
        """The entry's snapshot if its stamp matches the current versions (one fetch)."""
        found = self.manager.guard(self.manager.store.fetch, keys)
        entry, versions = found[0], found[1:]
        if entry is None or None in versions:
            return None
        stamp = b",".join(versions)  # type: ignore[arg-type]
        if entry.startswith(stamp + b"\n"):
            return self._decode(entry[len(stamp) + 1 :])
        return None

    def _release_lock(self) -> None:
        assert self._held_lock is not None
        key, token = self._held_lock
        self._held_lock = None
        with contextlib.suppress(CacheUnavailable):  # the lock expires by itself
            self.manager.guard(self.manager.store.unlock, key, token)


def encode_entry(
    manager: CacheManager, snapshot: Snapshot, stamp: bytes, fill: Fill, name: str, op: str
) -> bool:
    """Serialise a snapshot into `fill.value` (stamp line, payload); False if it is not stored."""
    stats = manager.counters
    try:
        payload = manager.serializer.dumps(snapshot)
    except Unserializable as exc:
        stats.unserializable += 1
        stats.bypass(name, op, "unserializable")
        stats.log.warning("unserializable", "sqlacache: a %s result was not cached: %s", name, exc)
        return False
    fill.value = stamp + b"\n" + payload
    if len(fill.value) > manager.config.max_bytes:
        stats.bypass(name, op, "too_large")
        return False
    return True


def _remember_fill(
    encode: Callable[[], bool],
    tier: LocalTier,
    mark: Any,
    fill: Fill,
    version_keys: list[str],
    versions: list[bytes | None],
    ttl: int,
    header: int,
) -> bool:
    """[local tier] `encode`, then keep the payload in the tier under the stamp read before the
    query (entries whose stamp had a missing version wait for their first Redis hit)."""
    if not encode():
        return False
    payload = fill.value[header:]
    tier.remember(
        mark, fill.entry_key, version_keys, versions, payload=payload, ttl=ttl, size=len(payload)
    )
    return True


def _no_key() -> None:
    return None


def _has_pending_changes(session: Session) -> bool:
    return bool(
        getattr(session, "_new", None)
        or getattr(session, "_deleted", None)
        or getattr(session.identity_map, "_modified", None)
    )


def _pending_tables(session: Session, schema_map: Mapping[Any, Any] | None) -> set[str]:
    tables: set[str] = set()
    objects = [*session.new, *session.dirty, *session.deleted]
    for obj in objects:
        for table in instance_state(obj).mapper.tables:
            if isinstance(table, Table):
                tables.add(table_name(table, schema_map))
    return tables
