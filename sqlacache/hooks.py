"""The read path: the `do_orm_execute` listener that serves SELECTs from the cache.

    decide (bound? options? plan? policy? session state?) -> one fetch of entry + versions
    -> hit: the stamp stored with the entry equals the current versions -> thaw into the session
    -> miss: run the query -> freeze -> store under the stamp read *before* the query (`fill`)

The cache never changes what a query returns and never fails it: anything unexpected in the
cache's own code falls back to the database, counted per kind and logged once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ORMExecuteState

from . import _sqla, verify
from .decision import Decision, Fetched, Skip, candidate, decide
from .entry import valid_payload
from .errors import CacheUnavailable, ConfigError
from .fill import Filler
from .runtime import Runtime
from .serialize import Snapshot

logger = logging.getLogger("sqlacache")


class ReadPath:
    """Serves cached reads for one bound cache."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stats = runtime.stats
        self.store = runtime.store
        self.filler = Filler(runtime)

    def on_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        """The `do_orm_execute` listener: a Result to serve, or None to let the ORM run the SQL."""
        found = candidate(state, self.runtime)
        if found is None:
            return None
        # The key is built from the statement as it will execute: listeners registered after
        # this one (a tenant's `with_loader_criteria`, say) change it first.
        result, went_on = _sqla.run_listeners_after(state)
        if result is not None:
            return result
        try:
            served = self._read(state, *found)
        except (ConfigError, DBAPIError):
            raise  # a bad cache_timeout is the caller's mistake; the database's errors are its own
        except Exception as exc:  # the cache's own fault: never the application's
            self.stats.internal_error(type(exc).__name__, exc)
            served = None
        if served is None and went_on:
            return state.invoke_statement()  # returning None would run those listeners again
        return served

    def _read(self, state: ORMExecuteState, db: Any, bind: Any) -> Result[Any] | None:
        decision = decide(state, db, bind, self.runtime)
        if isinstance(decision, Skip):
            self.stats.skip(decision)
            return None
        tier = self.runtime.local if decision.policy.local else None
        mark = None
        if tier is not None:  # a valid decoded entry in this process: no Redis round trip
            snapshot = tier.lookup(
                decision.entry_key, decision.version_keys, self._decoder(decision)
            )
            if snapshot is not None:
                result = self._hit(decision, snapshot, None, shared=True)
                if result is not None:
                    return result
            mark = tier.mark()  # before the fetch: see local_tier
        fetched_at = time.monotonic()  # before the stamp is read: see Fill.guard_rows
        try:
            answer = self.store.fetch(decision.fetch_keys())
        except CacheUnavailable:
            self.stats.error(decision.name, decision.op)
            return None
        fetched = Fetched.split(decision, answer, fetched_at, mark)
        payload = valid_payload(fetched.entry, fetched.versions)
        snapshot = None if payload is None else self.filler.decode(decision, payload)
        if snapshot is not None:
            if tier is not None:  # keep it decoded, under the versions it was validated with
                tier.remember(
                    mark,
                    decision.entry_key,
                    decision.version_keys,
                    fetched.versions,
                    snapshot=snapshot,
                    ttl=decision.ttl,
                    size=len(payload or b""),
                )
            result = self._hit(decision, snapshot, fetched.versions, shared=tier is not None)
            if result is not None:
                return result
        self.stats.miss(decision.plan.model, decision.name, decision.op)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "sqlacache miss %s %s key=%s", decision.name, decision.op, decision.entry_key
            )
        return self.filler.miss(decision, fetched, tier)

    def _hit(
        self,
        decision: Decision,
        snapshot: Snapshot,
        versions: list[bytes | None] | None,
        *,
        shared: bool,
    ) -> Result[Any] | None:
        """`shared`: the snapshot also serves later reads (the tier), so this one gets copies."""
        fraction = decision.policy.verify
        if fraction and versions is not None and verify.sampled(fraction):
            return verify.verified_hit(self.runtime, decision, snapshot, versions)
        result = self.filler.materialise(decision, snapshot, shared=shared)
        if result is not None:
            self.stats.hit(decision.plan.model, decision.name, decision.op)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "sqlacache hit %s %s key=%s", decision.name, decision.op, decision.entry_key
                )
        return result

    def _decoder(self, decision: Decision) -> Callable[[bytes], Snapshot | None]:
        return lambda payload: self.filler.decode(decision, payload)
