"""ORM write tracking: the rows a flush wrote (mapper events) and what a session's transaction
did that its reads must heed (Session events), recorded through the Core `WriteTracker`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state

from ._sqla import CACHE_OWN_SESSION, bind_execution_options
from .database import table_name
from .keys import UnstableValue, pk_text
from .tracking import WriteTracker
from .transaction_records import ConnectionTx, SessionTracker


class SessionWriteTracker:
    """Listens to mappers and the Session class, for one cache's `WriteTracker`."""

    def __init__(self, writes: WriteTracker) -> None:
        self.writes = writes
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []

    def listen(self) -> None:
        for target, name, fn in (
            (Mapper, "after_insert", self._after_insert),
            (Mapper, "after_update", self._after_update),
            (Mapper, "after_delete", self._after_delete),
            (Session, "after_begin", self._session_after_begin),
            (Session, "before_flush", self._session_before_flush),
            (Session, "after_flush_postexec", self._session_after_flush),
            (Session, "after_commit", self._session_after_commit),
            (Session, "after_transaction_end", self._session_after_transaction_end),
        ):
            event.listen(target, name, fn)
            self._listeners.append((target, name, fn))

    def unlisten(self) -> None:
        for target, name, fn in self._listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()

    def session_tracker(self, session: Session) -> SessionTracker:
        tracker: SessionTracker | None = session.info.get(self.writes.key)
        if tracker is None:
            tracker = SessionTracker()
            session.info[self.writes.key] = tracker
        return tracker

    # -- mapper events: the rows of a flush -----------------------------------------------------

    def _after_insert(self, mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        self._record_rows(mapper, connection, target)

    def _after_update(self, mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        self._record_rows(mapper, connection, target)

    def _after_delete(self, mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        self._record_rows(mapper, connection, target)

    def _record_rows(self, mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        db = self.writes.db_for(connection)
        if db is None:
            return
        tx = self.writes.tx_for(connection, db)
        state = instance_state(target)
        identities = []
        raw = [tuple(mapper.primary_key_from_instance(target))]
        if state.key is not None:
            raw.append(tuple(state.key[1]))  # the old identity, if the pk changed
        try:
            identities = [pk_text(pk) for pk in raw]
        except UnstableValue:
            identities = []
        schema_map = db.schema_map(bind_execution_options(connection))
        frame = tx.top
        for table in mapper.tables:
            if not isinstance(table, Table):
                continue
            name = table_name(table, schema_map)
            if identities:
                for identity in identities:
                    frame.add_row(name, identity)
                frame.raw_rows.setdefault(name, set()).update(raw)  # [cashews bridge]
            else:
                frame.table_wide.add(name)
            if tx.owner is not None:
                tx.owner.written.add(name)

    # -- Session events -------------------------------------------------------------------------

    def _session_after_begin(
        self, session: Session, transaction: Any, connection: Connection
    ) -> None:
        if session.info.get(CACHE_OWN_SESSION):
            return  # the cache's own read beside the caller's session: it writes nothing
        db = self.writes.db_for(connection)
        if db is None:
            return
        tracker = self.session_tracker(session)
        tracker.connections.append(connection)
        tracker.has_sql = True
        tracker.snapshot_tx = tracker.snapshot_tx or db.snapshot_per_transaction(connection)
        tracker.snapshot_after_write = db.is_sqlite
        tx = self.writes.tx_for(connection, db)
        tx.owner = tracker
        # a session joining an outer transaction must see what that transaction already wrote
        for frame in tx.frames:
            tracker.written |= frame.all_tables()

    def _session_before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        self.session_tracker(session).flushing = True

    def _session_after_flush(self, session: Session, flush_context: Any) -> None:
        tracker = session.info.get(self.writes.key)
        if tracker is None:
            return
        tracker.flushing = False
        for connection in tracker.connections:
            tx: ConnectionTx | None = connection.info.get(self.writes.key)
            if tx is None:
                continue
            for name in tx.flush_dml:
                if not any(name in frame.rows for frame in tx.frames):
                    tx.top.table_wide.add(name)  # e.g. an association table: no row identities
            tx.flush_dml.clear()
            self.writes.announce(tx)

    def _session_after_commit(self, session: Session) -> None:
        tracker: SessionTracker | None = session.info.get(self.writes.key)
        if tracker is None:
            return
        tracker.flushing = False
        for connection in tracker.connections:
            if connection.closed or connection.in_transaction():
                continue  # still inside an outer transaction the session did not begin
            self.writes.complete(connection, None)

    def _session_after_transaction_end(self, session: Session, transaction: Any) -> None:
        if transaction.parent is None:
            tracker: SessionTracker | None = session.info.get(self.writes.key)
            if tracker is not None:
                tracker.reset()
