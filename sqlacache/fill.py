"""The miss path: run the query once, snapshot what the database returned, store it under the
stamp read *before* the query.

    miss -> join an identical in-flight miss (same key, same stamp), or lead it
         -> (lock=True) wait for another process's fill
         -> query -> freeze -> encode -> guarded store (in the background under asyncio)

A write committed while the query ran changes the versions, so the stored stamp never validates
again: a slow reader can store a stale result, but nobody is ever served it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Result

from . import _sqla
from ._greenlet import in_greenlet, sleep
from .analysis import Plan
from .backends.base import Fill
from .decision import Decision, Fetched
from .entry import pack, stamp_of, valid_payload
from .errors import CacheUnavailable
from .keys import ROW_VERSION_MARGIN_MS, new_token
from .runtime import Runtime
from .serialize import PayloadError, Snapshot, Unserializable
from .snapshot import NotSnapshottable, build_result, enum_resolver, freeze, materialise
from .stampede import Flights

if TYPE_CHECKING:
    from .local_tier import LocalTier

logger = logging.getLogger("sqlacache")

PLANNED_TOKEN_SECONDS = 10.0


class Filler:
    """Runs the misses of one cache."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.stats = runtime.stats
        self.flights = Flights(wait_timeout=runtime.config.lock_timeout)
        self._planned: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def miss(
        self, decision: Decision, fetched: Fetched, tier: LocalTier | None = None
    ) -> Result[Any]:
        """Serve a miss: from an identical in-flight miss if one runs, else from the database."""
        flight_key = (decision.entry_key, tuple(fetched.versions))
        flight = None
        held_lock: tuple[str, bytes] | None = None
        if not fetched.leased:  # a writer holds a lease: nobody fills what it may make stale
            flight, leader = self.flights.lead_or_join(flight_key)
            if not leader:
                snapshot = self.flights.wait(flight)
                joined = None if snapshot is None else self.materialise(decision, snapshot, True)
                if joined is not None:
                    return joined
                flight = None
            elif decision.policy.lock:
                found, held_lock = self._wait_for_other_process(decision)
                if found is not None:
                    self.flights.finish(flight_key, flight, found)  # for our followers too
                    joined = self.materialise(decision, found, True)
                    if joined is not None:
                        self.stats.hit(decision.plan.model, decision.name, decision.op)
                        return joined
        snapshot = None
        try:
            result, snapshot = self._query(decision, want_snapshot=not fetched.leased)
            if snapshot is not None:
                self._store(decision, fetched, snapshot, tier, background=held_lock is None)
            return result
        finally:
            if flight is not None:
                self.flights.finish(flight_key, flight, snapshot)
            if held_lock is not None:
                self._release_lock(held_lock)

    def materialise(
        self, decision: Decision, snapshot: Snapshot, shared: bool
    ) -> Result[Any] | None:
        """A snapshot as this read's Result (None if the snapshot is unusable: counted, evicted)."""
        state = decision.state
        try:
            return materialise(
                snapshot,
                state.session,
                decision.plan,
                _sqla.identity_token(state.load_options),
                decision.single_entity,
                shared=shared,
            )
        except PayloadError as exc:
            self.payload_error(decision, exc)
            return None

    def decode(self, decision: Decision, payload: bytes) -> Snapshot | None:
        try:
            return self.runtime.serializer.loads(payload, enum_resolver(decision.plan))
        except PayloadError as exc:
            self.payload_error(decision, exc)
            return None

    def payload_error(self, decision: Decision, exc: Exception) -> None:
        self.stats.payload_errors += 1
        self.stats.log.warning(
            "payload", "sqlacache: discarded an unreadable cache entry (%s)", exc
        )
        with contextlib.suppress(CacheUnavailable):
            self.store.delete(decision.entry_key)

    # -- the query ------------------------------------------------------------------------------

    def _query(self, decision: Decision, want_snapshot: bool) -> tuple[Result[Any], Any]:
        """Run the statement; return the Result to hand back and, if wanted, its snapshot."""
        state = decision.state
        if want_snapshot and len(state.session.identity_map):
            # The session may hold objects of this result, edited, expired or loaded earlier,
            # which the ORM would not overwrite: the entry is filled from the database's rows,
            # read beside the session, and the caller's Result is built as a hit's is.
            found = self._query_beside(decision)
            if found is not None:
                return found
        replay, frozen = run_frozen(decision)
        shape = decision.plan.shape
        assert shape is not None
        if not want_snapshot:
            return replay, None
        if tuple(frozen.metadata.keys) != tuple(shape.metadata.keys):
            # hits must return the very column keys this result has: learn them, fill next time
            self._learn(decision, decision.plan.with_result_metadata(frozen.metadata))
            self.stats.bypass(decision.name, decision.op, "learned_result_shape")
            return replay, None
        try:
            return replay, self._snapshot(decision, frozen.data)
        except NotSnapshottable as reason:
            self.stats.bypass(decision.name, decision.op, str(reason))
        except Exception as exc:  # the query ran: its result is served whatever the cache did
            self.stats.internal_error(type(exc).__name__, exc)
        return replay, None

    def _query_beside(self, decision: Decision) -> tuple[Result[Any], Snapshot] | None:
        """The query in a session of the cache's own on the same connection, its snapshot thawed
        into the caller's session; None if the result cannot be cached (the caller's session
        then runs the query itself)."""
        shape = decision.plan.shape
        assert shape is not None
        result, own = _sqla.read_beside(decision.state)
        try:
            if shape.requires_unique:
                result = result.unique()
            frozen = result.freeze()
            if tuple(frozen.metadata.keys) != tuple(shape.metadata.keys):
                return None
            snapshot = self._snapshot(decision, frozen.data)
        except NotSnapshottable as reason:
            self.stats.bypass(decision.name, decision.op, str(reason))
            return None
        finally:
            own.close()
        replay = self.materialise(decision, snapshot, shared=True)
        return None if replay is None else (replay, snapshot)

    def _snapshot(self, decision: Decision, rows: Any) -> Snapshot:
        if len(rows) > self.runtime.config.max_rows:
            raise NotSnapshottable("too_many_rows")
        plan = decision.plan
        assert plan.shape is not None
        snapshot, missing_tables, new_mappers = freeze(
            rows, plan.shape, decision.single_entity, plan
        )
        if missing_tables or new_mappers:
            # the result reached tables the plan did not foresee: learn them, fill next time
            self._learn(decision, plan.with_more(missing_tables, new_mappers))
            raise NotSnapshottable("learned_dependencies")
        return snapshot

    def _learn(self, decision: Decision, plan: Plan) -> None:
        """Replace the statement's plan with what its result taught (see `analysis.Plan`)."""
        cache_key = _sqla.statement_cache_key(decision.state.statement)
        decision.db.plans.put(cache_key.key, plan)

    # -- the store ------------------------------------------------------------------------------

    def _store(
        self,
        decision: Decision,
        fetched: Fetched,
        snapshot: Snapshot,
        tier: LocalTier | None,
        *,
        background: bool,
    ) -> None:
        stamp, fill = self._stamp(decision, fetched)
        if background and self.store.shared and self.store.fills_atomically and in_greenlet():
            # The reader has its result: serialising and writing overlap the work that follows.
            # (With a cross-process fill lock held, the entry must land before it is released;
            # on a cluster, whose versions land before the entry, this process's next read must
            # not come in between and miss.)
            self.runtime.background.spawn(
                self._store_later(decision, fetched, snapshot, stamp, fill, tier)
            )
            return
        if not self._encode(decision, snapshot, stamp, fill):
            return
        self._keep_local(tier, decision, fetched, snapshot, fill)
        try:
            self.store.store(fill)
        except CacheUnavailable:
            self.stats.error(decision.name, decision.op)
            return
        self.stats.stored(decision.name, decision.op)

    async def _store_later(
        self,
        decision: Decision,
        fetched: Fetched,
        snapshot: Snapshot,
        stamp: bytes,
        fill: Fill,
        tier: LocalTier | None,
    ) -> None:
        """Readers in this process that arrive before it lands are served by the finished miss
        (see `stampede`); other processes simply miss until then."""
        if not self._encode(decision, snapshot, stamp, fill):
            return
        self._keep_local(tier, decision, fetched, snapshot, fill)
        try:
            await self.store.store_async(fill)
        except CacheUnavailable:
            self.stats.error(decision.name, decision.op)
            return
        self.stats.stored(decision.name, decision.op)

    def _keep_local(
        self,
        tier: LocalTier | None,
        decision: Decision,
        fetched: Fetched,
        snapshot: Snapshot,
        fill: Fill,
    ) -> None:
        """The in-process tier keeps the fill too, under the stamp read before the query (an
        entry whose stamp had a missing version waits for its first Redis hit)."""
        if tier is None or fill.init or fill.init_rows:
            return
        tier.remember(
            fetched.local_mark,
            decision.entry_key,
            decision.version_keys,
            fetched.versions,
            snapshot=snapshot,
            ttl=decision.ttl,
            size=len(fill.value),
        )

    def _encode(self, decision: Decision, snapshot: Snapshot, stamp: bytes, fill: Fill) -> bool:
        """Serialise a snapshot into `fill.value`; False if it is not to be stored."""
        stats = self.stats
        try:
            payload = self.runtime.serializer.dumps(snapshot)
        except Unserializable as exc:
            stats.unserializable += 1
            stats.bypass(decision.name, decision.op, "unserializable")
            stats.log.warning(
                "unserializable", "sqlacache: a %s result was not cached: %s", decision.name, exc
            )
            return False
        except Exception as exc:
            stats.internal_error(type(exc).__name__, exc)
            return False
        fill.value = pack(stamp, payload)
        if len(fill.value) > self.runtime.config.max_bytes:
            stats.bypass(decision.name, decision.op, "too_large")
            return False
        return True

    def _stamp(self, decision: Decision, fetched: Fetched) -> tuple[bytes, Fill]:
        """The stamp read before the query; missing versions get a token to initialise.

        A missing row version is created only if its table's version is still the one this read
        saw (see lua/fill.lua); table versions never expire and are created if still missing.
        """
        # row versions this entry depends on must outlive it; table versions never expire
        fill = Fill(
            decision.entry_key,
            b"",
            decision.ttl * 1000,
            extend_ms=decision.ttl * 1000 + ROW_VERSION_MARGIN_MS,
            captured_at=fetched.fetched_at,
        )
        tokens: list[bytes] = []
        row_count = len(decision.row_versions)
        guards = decision.keyset.row_guards
        for position, (key, token) in enumerate(
            zip(decision.version_keys, fetched.versions, strict=True)
        ):
            if position < row_count:
                if token is None:
                    token = new_token()
                    guard = guards[position]
                    planned = self.planned_token(guard)
                    fill.init_rows.append(
                        (key, token, guard, fetched.guards_seen[position], planned)
                    )
                else:
                    fill.extend.append(key)
            elif token is None:
                token = self.planned_token(key)
                fill.init.append((key, token, None))
            tokens.append(token)
        return stamp_of(tokens), fill

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

    # -- across processes (lock=True) -----------------------------------------------------------

    def _wait_for_other_process(
        self, decision: Decision
    ) -> tuple[Snapshot | None, tuple[str, bytes] | None]:
        """One process fills, the others poll for its entry (bounded by `lock_timeout`).

        Returns the entry found, and the lock if this process took it (it must release it).
        """
        config = self.runtime.config
        lock_key = self.runtime.namespace.fill_lock(decision.entry_key)
        token = new_token()
        keys = [decision.entry_key, *decision.version_keys]
        try:
            acquired = self.store.try_lock(lock_key, token, int(config.lock_timeout * 1000))
        except CacheUnavailable:
            return None, None
        if acquired:
            # the previous holder may have stored and released since our first fetch
            with contextlib.suppress(CacheUnavailable):
                found = self._valid_entry(decision, keys)
                if found is not None:
                    self._release_lock((lock_key, token))
                    return found, None
            return None, (lock_key, token)
        deadline = time.monotonic() + config.lock_timeout
        delay = 0.01
        while time.monotonic() < deadline:
            sleep(delay)
            delay = min(delay * 1.5, 0.05)
            try:
                found = self._valid_entry(decision, keys)
            except CacheUnavailable:
                return None, None
            if found is not None:
                return found, None
        return None, None

    def _valid_entry(self, decision: Decision, keys: list[str]) -> Snapshot | None:
        """The entry's snapshot if its stamp matches the current versions (one fetch)."""
        found = self.store.fetch(keys)
        payload = valid_payload(found[0], found[1:])
        return None if payload is None else self.decode(decision, payload)

    def _release_lock(self, held: tuple[str, bytes]) -> None:
        with contextlib.suppress(CacheUnavailable):  # the lock expires by itself
            self.store.unlock(*held)


def run_frozen(decision: Decision) -> tuple[Result[Any], Any]:
    """Run the statement through the ORM; return the Result to hand back and the frozen result
    its rows come from (uniqued as the ORM requires for joined eager loads of collections)."""
    result = decision.state.invoke_statement()
    shape = decision.plan.shape
    assert shape is not None
    if shape.requires_unique:
        result = result.unique()
    frozen = result.freeze()
    replay = frozen()
    if shape.requires_unique:
        _sqla.copy_unique_filter(replay, build_result(shape, False, ()))
    return replay, frozen
