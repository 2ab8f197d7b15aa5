"""Which tables a DDL statement makes stale as a whole.

Dropping and re-creating a table (test suites do it between tests) changes its contents without
any INSERT, UPDATE or DELETE, so DDL is a table-wide write of every table it touches. A construct
names its table (`CreateTable`, `DropIndex`, `AddConstraint`, ...). A DDL text (`DDL("...")`, or a
`text()`/driver string starting with CREATE, DROP, ALTER, TRUNCATE, RENAME) is searched for the
names of the tables the application maps; when it names none of them it may still reach any (a
view, a trigger, a function, `DROP SCHEMA ... CASCADE`), so it is taken as a write of all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Index, Sequence, Table
from sqlalchemy.sql import ddl as sa_ddl
from sqlalchemy.sql.schema import Column, Constraint

from . import _sqla
from .database import table_name

#: raw SQL that changes the schema (or, for TRUNCATE, every row): a table-wide write
DDL_SQL = re.compile(r"^\s*(create|drop|alter|truncate|rename)\b", re.IGNORECASE)

#: DDL constructs that change no table's contents
_HARMLESS = (sa_ddl.CreateSequence, sa_ddl.DropSequence, sa_ddl.CreateSchema)

_WORDS = re.compile(r'"?([A-Za-z_][\w$]*)"?(?:\s*\.\s*"?([A-Za-z_][\w$]*)"?)?')


def known_tables() -> list[Table]:
    """Every table of the metadata of every mapped class (what a cached statement can read)."""
    from .mapped import MAPPERS

    seen: dict[int, Table] = {}
    metadatas: dict[int, Any] = {}
    for mapper in MAPPERS.all_mappers():
        for table in getattr(mapper, "tables", ()):
            metadata = getattr(table, "metadata", None)
            if isinstance(table, Table) and metadata is not None:
                metadatas.setdefault(id(metadata), metadata)
    for metadata in metadatas.values():
        for table in metadata.tables.values():
            seen.setdefault(id(table), table)
    return list(seen.values())


def construct_tables(element: Any) -> list[Table] | None:
    """The tables a DDL construct names; None when it cannot say (then: every table)."""
    if isinstance(element, _HARMLESS) or isinstance(getattr(element, "element", None), Sequence):
        return []
    if isinstance(element, sa_ddl.DDL):
        return None  # a text: see `ddl_write_names`
    target = getattr(element, "element", None)
    if isinstance(target, Table):
        return [target]
    if isinstance(target, (Index, Constraint, Column)):
        table = getattr(target, "table", None)
        return [table] if isinstance(table, Table) else None
    return None


def ddl_write_names(
    element: Any, text: str | None, schema_map: Mapping[Any, Any] | None
) -> set[str]:
    """The table names (as version keys name them) a DDL construct, or a DDL text, writes."""
    if text is None:
        tables = construct_tables(element)
        if tables is not None:
            return names_of(tables, schema_map)
        named_table = getattr(element, "table_name", None)  # Alembic's ALTER TABLE constructs
        if isinstance(named_table, str) and named_table:
            schema = getattr(element, "schema", None)
            if schema_map:
                schema = schema_map.get(schema, schema)
            return {f"{schema}.{named_table}" if schema else named_table}
        text = _text_of(element)  # DDL("..."), perhaps attached to a table
        target = getattr(element, "target", None)
        if isinstance(target, Table):
            named = _named_in(text, schema_map) if text else set()
            return names_of([target], schema_map) | named
    named = _named_in(text, schema_map) if text else set()
    return named or _all(schema_map)


def _text_of(element: Any) -> str | None:
    statement = getattr(element, "statement", None)
    return statement if isinstance(statement, str) else None


def _named_in(text: str, schema_map: Mapping[Any, Any] | None) -> set[str]:
    """Names of known tables the text mentions, also under the schema it qualifies them with."""
    from .tracking import cascade_targets  # tracking imports this module

    by_name: dict[str, list[Table]] = {}
    for table in known_tables():
        by_name.setdefault(table.name.lower(), []).append(table)
    truncating = "truncate" in text.lower()  # TRUNCATE ... CASCADE empties referencing tables
    names: set[str] = set()
    for first, second in _WORDS.findall(text):
        schema, word = (first, second) if second else (None, first)
        for table in by_name.get(word.lower(), ()):
            names.add(table_name(table, schema_map))
            if schema:
                names.add(f"{schema}.{table.name}")
            if truncating:
                names.update(
                    table_name(t, schema_map) for t in cascade_targets(table, "delete", None)
                )
    return names


def _all(schema_map: Mapping[Any, Any] | None) -> set[str]:
    return {table_name(t, schema_map) for t in known_tables()}


def _plain(table: Table) -> Table:
    return _sqla.plain_table(table)


def names_of(tables: Iterable[Table], schema_map: Mapping[Any, Any] | None) -> set[str]:
    return {table_name(_plain(t), schema_map) for t in tables}
