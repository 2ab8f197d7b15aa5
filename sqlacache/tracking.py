"""Write tracking: what each transaction wrote, per connection and per savepoint.

Every write is seen at the Core level (`after_execute` for INSERT/UPDATE/DELETE, whoever issued
it: a flush, bulk DML, Core DML on an engine or connection); ORM mapper events add the primary keys
of flushed rows (`session_tracking`). Writes are kept per connection transaction in a stack of
savepoint frames (`transaction_records`). The moments at which they become invalidations:

    flush end / Core DML  -> bump + lease            (Invalidator.announce)
    after COMMIT          -> bump again + release    (session after_commit; for Core connections,
                                                      their next begin or pool checkin)
    ROLLBACK              -> release                 (savepoint rollback drops only its frame)

SQLAlchemy fires `ConnectionEvents.commit` *before* COMMIT, which is why a Core connection's final
bump waits for its next begin or checkin: its lease keeps readers from filling meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import CompoundSelect, Select, TextualSelect

from . import _sqla
from .database import Database, table_name
from .ddl import DDL_SQL, ddl_write_names
from .errors import CacheUnavailable
from .invalidation import Invalidator
from .transaction_records import ConnectionTx
from .writes import cascade_targets

logger = logging.getLogger("sqlacache")

_READ_ONLY_SQL = re.compile(r"^\s*(\(\s*)*(select|show|explain|values|table)\b", re.IGNORECASE)


class WriteTracker:
    """Listens to engines; owns the per-transaction records and their delivery (the ORM's events
    reach it through `session_tracking.SessionWriteTracker`)."""

    def __init__(
        self,
        invalidator: Invalidator,
        db_for: Callable[[Any], Database | None],
        key: tuple[str, int],
    ) -> None:
        self.invalidator = invalidator
        self.db_for = db_for
        self.key = key  # in session.info and connection.info: per cache, several may share one

    # -- wiring ---------------------------------------------------------------------------------

    def listen_engine(self, engine: Engine) -> list[tuple[str, Callable[..., Any]]]:
        """Listen to `engine`'s events; return the listeners, which the caller removes when it
        unbinds the engine (kept here, they would keep the engine alive with the cache)."""
        listeners: list[tuple[str, Callable[..., Any]]] = []
        for name, fn in (
            ("after_execute", self._after_execute),
            ("begin", self._on_begin),
            ("commit", self._on_commit),
            ("rollback", self._on_rollback),
            ("savepoint", self._on_savepoint),
            ("release_savepoint", self._on_release_savepoint),
            ("rollback_savepoint", self._on_rollback_savepoint),
            ("checkin", self._on_checkin),
        ):
            event.listen(engine, name, fn)
            listeners.append((name, fn))
        return listeners

    # -- records --------------------------------------------------------------------------------

    def tx_for(self, connection: Connection, db: Database) -> ConnectionTx:
        """The record of `connection`'s current transaction, created at its first write."""
        tx: ConnectionTx | None = connection.info.get(self.key)
        if tx is None or tx.db is not db:
            tx = ConnectionTx(db)
            connection.info[self.key] = tx
        return tx

    # -- Core events ----------------------------------------------------------------------------

    def _after_execute(
        self,
        conn: Connection,
        clauseelement: Any,
        multiparams: Any,
        params: Any,
        execution_options: Mapping[str, Any],
        result: Any,
    ) -> None:
        if isinstance(clauseelement, (Select, CompoundSelect, UpdateBase)):
            compiled = getattr(getattr(result, "context", None), "compiled", None)
            if getattr(compiled, "ctes", None):
                self._record_cte_dml(conn, compiled, execution_options)
        if isinstance(clauseelement, UpdateBase):
            db = self.db_for(conn)
            if db is not None:
                parameters = multiparams[0] if multiparams else params
                self._record_dml(conn, db, clauseelement, parameters, execution_options)
        elif isinstance(clauseelement, ExecutableDDLElement):
            db = self.db_for(conn)
            if db is not None:
                self._record_ddl(conn, db, clauseelement, None, execution_options)
        elif isinstance(clauseelement, (TextClause, TextualSelect, str)):
            text = clauseelement if isinstance(clauseelement, str) else _text_of(clauseelement)
            if not _READ_ONLY_SQL.match(text):
                db = self.db_for(conn)
                if db is not None:
                    self._record_raw_sql(conn, db)
                    if DDL_SQL.match(text):
                        self._record_ddl(conn, db, None, text, execution_options)

    def _record_dml(
        self,
        conn: Connection,
        db: Database,
        statement: UpdateBase,
        parameters: Any,
        execution_options: Mapping[str, Any],
    ) -> None:
        target = getattr(statement, "table", None)
        if not isinstance(target, Table):
            return
        table = _sqla.plain_table(target)
        schema_map = db.schema_map(_sqla.bind_execution_options(conn), execution_options)
        name = table_name(table, schema_map)
        tx = self.tx_for(conn, db)
        frame = tx.top
        frame.tables.add(name)
        flushing = tx.owner is not None and tx.owner.flushing
        if flushing:
            tx.flush_dml.add(name)  # rows come from mapper events; see _session_after_flush
        else:
            frame.table_wide.add(name)
        kind = (
            "insert"
            if isinstance(statement, Insert)
            else "delete"
            if isinstance(statement, Delete)
            else "update"
        )
        updated = _updated_columns(statement, parameters) if isinstance(statement, Update) else None
        cascaded = [table_name(t, schema_map) for t in cascade_targets(table, kind, updated)]
        frame.tables.update(cascaded)
        frame.table_wide.update(cascaded)
        if tx.owner is not None:
            tx.owner.written.add(name)
            tx.owner.written.update(cascaded)
        if db.autocommit(conn):
            self.complete(conn, tx)
        elif not flushing:
            self.announce(tx)

    def _record_cte_dml(
        self, conn: Connection, compiled: Any, execution_options: Mapping[str, Any]
    ) -> None:
        """A data-modifying CTE (`WITH u AS (UPDATE ... RETURNING ...) SELECT ...`) writes its
        table like the same DML run alone: leased now, bumped after commit, released on rollback.
        The compiled statement lists every CTE it renders, nested ones included."""
        statements = [
            cte.element
            for cte in compiled.ctes
            if isinstance(getattr(cte, "element", None), UpdateBase)
        ]
        if not statements:
            return
        db = self.db_for(conn)
        if db is not None:
            for statement in statements:
                self._record_dml(conn, db, statement, None, execution_options)

    def _record_ddl(
        self,
        conn: Connection,
        db: Database,
        element: Any,
        text: str | None,
        execution_options: Mapping[str, Any],
    ) -> None:
        """DDL changes its tables' contents without DML: a table-wide write of each."""
        try:
            schema_map = db.schema_map(_sqla.bind_execution_options(conn), execution_options)
            names = ddl_write_names(element, text, schema_map)
        except Exception:  # never let the cache break a migration; evicting all is safe
            logger.exception("sqlacache: could not tell which tables a DDL statement changes")
            names = ddl_write_names(None, "", None)
        if names:
            self._record_table_wide(conn, db, names)

    def _record_table_wide(self, conn: Connection, db: Database, names: set[str]) -> None:
        tx = self.tx_for(conn, db)
        frame = tx.top
        frame.tables.update(names)
        frame.table_wide.update(names)
        if tx.owner is not None:
            tx.owner.written.update(names)
        if db.autocommit(conn):
            self.complete(conn, tx)
        elif not (tx.owner is not None and tx.owner.flushing):
            self.announce(tx)

    def _record_raw_sql(self, conn: Connection, db: Database) -> None:
        tx = self.tx_for(conn, db)
        if tx.owner is not None:
            tx.owner.raw_sql = True

    def _on_begin(self, conn: Connection) -> None:
        tx: ConnectionTx | None = conn.info.get(self.key)
        if tx is not None and tx.committed:
            # the previous transaction of this connection has committed by now
            self.complete(conn, tx)

    def _on_commit(self, conn: Connection) -> None:
        tx: ConnectionTx | None = conn.info.get(self.key)
        if tx is not None:
            self.invalidator.before_commit(tx.announcing)  # fired before COMMIT is sent
            tx.committed = True

    def _on_rollback(self, conn: Connection) -> None:
        tx: ConnectionTx | None = conn.info.pop(self.key, None)
        if tx is not None and tx.leased:
            self.invalidator.release(tx.db.identity, tx.leased, tx.announcing)

    def _on_savepoint(self, conn: Connection, name: str) -> None:
        db = self.db_for(conn)
        if db is not None:
            self.tx_for(conn, db).begin_savepoint()

    def _on_release_savepoint(self, conn: Connection, name: str, context: Any) -> None:
        tx: ConnectionTx | None = conn.info.get(self.key)
        if tx is not None:
            tx.release_savepoint()

    def _on_rollback_savepoint(self, conn: Connection, name: str, context: Any) -> None:
        tx: ConnectionTx | None = conn.info.get(self.key)
        if tx is not None:
            tx.rollback_savepoint()

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        tx: ConnectionTx | None = record.info.pop(self.key, None)
        if tx is None:
            return
        if tx.committed:
            self._deliver_complete(tx)
        elif tx.leased:
            self.invalidator.release(tx.db.identity, tx.leased, tx.announcing)

    # -- delivery -------------------------------------------------------------------------------

    def announce(self, tx: ConnectionTx) -> None:
        new = tx.merged().minus(tx.announced)
        acquire = self.invalidator.lease_keys(tx.db.identity, new) - tx.leased
        if not new and not acquire:
            return
        tx.announced.merge(new)
        tx.leased |= acquire
        in_flight = self.invalidator.announce(tx.db.identity, new, acquire)
        if in_flight is not None:
            tx.announcing.append(in_flight)

    def complete(self, conn: Connection, tx: ConnectionTx | None) -> None:
        tx = conn.info.pop(self.key, None) if tx is None else tx
        conn.info.pop(self.key, None)
        if tx is not None:
            self._deliver_complete(tx)

    def _deliver_complete(self, tx: ConnectionTx) -> None:
        writes = tx.merged()
        if not writes and not tx.leased:
            return
        try:
            self.invalidator.complete(tx.db.identity, writes, tx.leased, tx.announcing)
        except asyncio.CancelledError:
            raise
        except CacheUnavailable:
            pass  # queued by the invalidator
        except Exception:  # never let the cache break a commit
            logger.exception("sqlacache: post-commit invalidation failed; queued")
            self.invalidator.queue(tx.db.identity, writes.all_tables())


# -- helpers --------------------------------------------------------------------------------------


def _text_of(element: Any) -> str:
    if isinstance(element, TextualSelect):
        element = element.element
    return str(getattr(element, "text", ""))


def _updated_columns(statement: Update, parameters: Any) -> set[str] | None:
    names: set[str] = set()
    for source in _sqla.update_values(statement):
        items = source.keys() if isinstance(source, Mapping) else (k for k, _ in source)
        names.update(getattr(k, "key", None) or getattr(k, "name", None) or str(k) for k in items)
    if isinstance(parameters, Mapping):
        names.update(str(k) for k in parameters)
    return names or None
