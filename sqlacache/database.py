"""A bound engine: its database identity, how its tables are named in keys, its isolation level.

Tables are named by schema-qualified name *after* `schema_translate_map`, on reads and writes
alike, so two tenants' `users` tables have separate versions (SPEC C7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine

from .analysis import PlanCache

SNAPSHOT_ISOLATION = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def database_identity(engine: Engine) -> str:
    """`host:port/dbname` of the engine URL (a file path for SQLite)."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return f"sqlite:{url.database or ':memory:'}"
    port = url.port
    if port is None:
        port = getattr(engine.dialect, "default_port", None) or _DEFAULT_PORTS.get(
            url.get_backend_name(), ""
        )
    return f"{url.host or 'localhost'}:{port}/{url.database or ''}"


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def table_name(table: Table, schema_map: Mapping[Any, Any] | None) -> str:
    if not schema_map:
        return table.fullname
    schema = schema_map.get(table.schema, table.schema)
    return f"{schema}.{table.name}" if schema else table.name


class Database:
    """One bound engine (an `AsyncEngine`'s sync engine)."""

    def __init__(self, engine: Engine, identity: str, volatile: frozenset[str]) -> None:
        self.engine = engine
        self.identity = identity
        self.dialect = engine.dialect
        self.plans = PlanCache(engine.dialect, volatile)
        self.engine_schema_map: Mapping[Any, Any] | None = engine._execution_options.get(
            "schema_translate_map"
        )
        self.is_sqlite = engine.dialect.name == "sqlite"

    def schema_map(self, *layers: Mapping[str, Any] | None) -> Mapping[Any, Any] | None:
        """`schema_translate_map` merged from engine, connection, statement and call (last wins)."""
        merged: dict[Any, Any] | None = None
        for options in (None, *layers):
            found = (
                self.engine_schema_map if options is None else options.get("schema_translate_map")
            )
            if found:
                merged = {**(merged or {}), **found}
        if merged and "_none" in merged:
            # SQLAlchemy adds "_none" for the None key to a map in place at its first execution;
            # without this, the first read of a tenant would be keyed apart from all later ones
            merged[None] = merged.pop("_none")
        return merged

    def isolation_of(self, connection: Connection | None) -> str:
        """The isolation level a connection runs under, without asking the server."""
        level = None
        if connection is not None:
            level = connection._execution_options.get("isolation_level")
        if level is None:
            level = self.engine._execution_options.get("isolation_level")
        if level is None:
            level = getattr(self.dialect, "_on_connect_isolation_level", None)
        if level is None:
            level = getattr(self.dialect, "default_isolation_level", None) or "READ COMMITTED"
        return str(level).upper().replace("_", " ")

    def snapshot_per_transaction(self, connection: Connection | None) -> bool:
        """True when a transaction reads one snapshot taken at its first statement."""
        if self.is_sqlite:
            return not _sqlite_reads_outside_transactions(connection)
        return self.isolation_of(connection) in SNAPSHOT_ISOLATION

    def autocommit(self, connection: Connection) -> bool:
        return self.isolation_of(connection) == "AUTOCOMMIT"


def _sqlite_reads_outside_transactions(connection: Connection | None) -> bool:
    """Whether the sqlite driver runs SELECTs outside any transaction (its legacy default).

    In that mode the driver begins a transaction only before a write, so each read sees the latest
    committed data, like READ COMMITTED, until the transaction writes. With `isolation_level=None`
    and an explicit BEGIN (SQLAlchemy's SAVEPOINT recipe), or `autocommit=False` (Python 3.12),
    a transaction reads one snapshot: treated like REPEATABLE READ.
    """
    if connection is None:
        return True
    try:
        dbapi = connection.connection.dbapi_connection
    except Exception:
        return False
    if getattr(dbapi, "autocommit", None) is False:
        return False
    return getattr(dbapi, "isolation_level", "") is not None
