"""A bound engine: its database identity, how its tables are named in keys, its isolation level;
and `Databases`, the engines a cache is bound to, held weakly.

Tables are named by schema-qualified name *after* `schema_translate_map`, on reads and writes
alike, so two tenants' `users` tables have separate versions and never share entries.
"""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool

from . import _sqla
from .analysis import PlanCache

logger = logging.getLogger("sqlacache")

SNAPSHOT_ISOLATION = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def database_identity(engine: Engine) -> str:
    """`host:port/dbname` of the engine URL (an absolute file path for SQLite).

    An engine whose URL names no shared database (in-memory SQLite, `sqlite://`, a creator with
    no URL) gets an identity of its own: two such engines hold different data, so they must
    never share entries. A named shared-cache memory database is shared by the engines of one
    process only.
    """
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_identity(engine)
    query = url.query
    host = url.host or _query_value(query, "host")
    database = url.database or _query_value(query, "dbname") or _query_value(query, "database")
    if not host and not database:
        logger.warning(
            "sqlacache: the URL of engine %r names no database, so its cache entries are its "
            "own: writes made through other engines or processes do not reach them. Pass "
            "bind(engine, database_id=...) to name the database it connects to.",
            url.render_as_string(hide_password=True),
        )
        return f"private:{backend}:{_engine_token(engine)}"
    port = url.port or _query_value(query, "port")
    if port is None:
        port = getattr(engine.dialect, "default_port", None) or _DEFAULT_PORTS.get(backend, "")
    return f"{host or 'localhost'}:{port}/{database or ''}"


def _query_value(query: Mapping[str, Any], name: str) -> str | None:
    value = query.get(name)
    if isinstance(value, tuple):
        value = value[0] if value else None
    return str(value) if value else None


def _sqlite_identity(engine: Engine) -> str:
    url = engine.url
    database = url.database or ""
    query = {k: _query_value(url.query, k) for k in url.query}
    if database in ("", ":memory:"):
        return f"sqlite:private:{_engine_token(engine)}"
    if database.startswith("file:"):
        path, _, uri_query = database[len("file:") :].partition("?")
        options = {**dict(_uri_pairs(uri_query)), **{k: v for k, v in query.items() if v}}
        if path in ("", ":memory:") or options.get("mode") == "memory":
            if options.get("cache") == "shared":  # shared by name among this process' connections
                return f"sqlite:memory:{path}:{_process_token()}"
            return f"sqlite:private:{_engine_token(engine)}"
        database = path
    return f"sqlite:{os.path.abspath(database)}"


def _uri_pairs(uri_query: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (p.partition("=") for p in uri_query.split("&") if p)]


#: per pool, since an option engine (`engine.execution_options(...)`) shares its database
_ENGINE_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_PROCESS_TOKEN = uuid.uuid4().hex


def _engine_token(engine: Engine) -> str:
    token = _ENGINE_TOKENS.get(engine.pool)
    if token is None:
        token = f"{_process_token()}:{uuid.uuid4().hex[:12]}"
        _ENGINE_TOKENS[engine.pool] = token
    return token


def _process_token() -> str:
    # a forked child's memory databases are copies that diverge from the parent's from then on
    return f"{_PROCESS_TOKEN[:12]}-{os.getpid()}"


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def table_name(table: Table, schema_map: Mapping[Any, Any] | None) -> str:
    if not schema_map:
        return table.fullname
    schema = schema_map.get(table.schema, table.schema)
    return f"{schema}.{table.name}" if schema else table.name


class Database:
    """One bound engine (an `AsyncEngine`'s sync engine)."""

    def __init__(self, engine: Engine, identity: str, volatile: frozenset[str]) -> None:
        # weakly: the cache must not keep an engine alive that the application dropped
        self._engine = weakref.ref(engine)
        self.identity = identity
        self.dialect = engine.dialect
        self.plans = PlanCache(engine.dialect, volatile)
        self.engine_schema_map: Mapping[Any, Any] | None = _sqla.bind_execution_options(engine).get(
            "schema_translate_map"
        )
        self.is_sqlite = engine.dialect.name == "sqlite"
        #: listeners installed on the engine for this cache, removed when it is unbound
        self.listeners: list[tuple[str, Callable[..., Any]]] = []

    @property
    def engine(self) -> Engine:
        engine = self._engine()
        if engine is None:
            raise ReferenceError(f"the engine of database {self.identity!r} was garbage-collected")
        return engine

    def schema_map(self, *layers: Mapping[str, Any] | None) -> Mapping[Any, Any] | None:
        """`schema_translate_map` merged from engine, connection, statement and call (last wins)."""
        merged: dict[Any, Any] | None = None
        for options in (None, *layers):
            found = (
                self.engine_schema_map if options is None else options.get("schema_translate_map")
            )
            if found:
                merged = {**(merged or {}), **found}
        if merged and _sqla.SCHEMA_MAP_NONE_KEY in merged:
            # SQLAlchemy adds "_none" for the None key to a map in place at its first execution;
            # without this, the first read of a tenant would be keyed apart from all later ones
            merged[None] = merged.pop(_sqla.SCHEMA_MAP_NONE_KEY)
        return merged

    def isolation_of(self, connection: Connection | None) -> str:
        """The isolation level a connection runs under, without asking the server."""
        level = None
        if connection is not None:
            level = _sqla.bind_execution_options(connection).get("isolation_level")
        if level is None:
            level = _sqla.bind_execution_options(self.engine).get("isolation_level")
        if level is None:
            level = _sqla.connect_isolation_level(self.dialect)
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


class Databases:
    """The engines one cache is bound to, found by engine or by pool, all held weakly.

    An engine the application drops is collected, and its entry goes with it; listeners on it die
    with it. `dispose()` gives an engine a new pool: the entry follows it, so the engine stays
    cached. Lookups by pool (every ORM execute) cost one dict lookup.
    """

    def __init__(self) -> None:
        self._by_engine: weakref.WeakKeyDictionary[Engine, Database] = weakref.WeakKeyDictionary()
        self._by_pool: dict[int, tuple[weakref.ReferenceType[Pool], Database]] = {}

    def add(self, database: Database, listeners: list[tuple[str, Callable[..., Any]]]) -> None:
        """Record a bound engine and the listeners installed on it for this cache."""
        engine = database.engine
        self._by_engine[engine] = database
        self._index_pool(engine.pool, database)
        event.listen(engine, "engine_disposed", self._on_disposed)
        database.listeners = [*listeners, ("engine_disposed", self._on_disposed)]

    def for_bind(self, bind: Any) -> Database | None:
        """The database of an Engine or Connection, if it is bound to this cache."""
        engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
        return None if engine is None else self.for_pool(engine.pool)

    def identities(self) -> list[str]:
        return sorted({db.identity for db in self})

    def for_pool(self, pool: Pool) -> Database | None:
        found = self._by_pool.get(id(pool))
        if found is None or found[0]() is not pool:
            return None
        return found[1]

    def __contains__(self, engine: Engine) -> bool:
        return engine in self._by_engine

    def __iter__(self) -> Iterator[Database]:
        return iter(list(self._by_engine.values()))

    def remove(self, engine: Engine) -> None:
        """Unbind one engine: its listeners removed, its entries gone."""
        database = self._by_engine.pop(engine, None)
        if database is None:
            return
        for name, fn in database.listeners:
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)
        database.listeners = []
        database.plans.clear()
        for key in [k for k, (_, db) in self._by_pool.items() if db is database]:
            self._by_pool.pop(key, None)

    def clear(self) -> None:
        for engine in list(self._by_engine.keys()):
            self.remove(engine)
        self._by_pool.clear()

    def _index_pool(self, pool: Pool, database: Database) -> None:
        key = id(pool)

        def forget(_: object) -> None:
            found = self._by_pool.get(key)
            if found is not None and found[0]() is None:
                del self._by_pool[key]

        self._by_pool[key] = (weakref.ref(pool, forget), database)

    def _on_disposed(self, engine: Engine) -> None:
        database = self._by_engine.get(engine)
        if database is None:
            return
        for key in [k for k, (_, db) in self._by_pool.items() if db is database]:
            self._by_pool.pop(key, None)
        self._index_pool(engine.pool, database)


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
