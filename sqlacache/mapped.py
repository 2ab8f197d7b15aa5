"""Mapped tables: which mapper owns a table, and which tables a mapper, a relationship or an
eager load reads (column properties, join conditions and inheritance included).

Everything here is about the mapping, not about one statement; `analysis` asks it when it plans.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnClause

from . import _sqla

EAGER_STRATEGIES = frozenset({"selectin", "joined", "subquery", "immediate"})


def plain(table: Table) -> Table:
    """The Table itself: ORM statements hold annotated copies that neither equal nor hash like it."""
    return _sqla.plain_table(table)


def entity_tables(mapper: Mapper[Any]) -> tuple[Table, ...]:
    """Every table a row of this identity may live in, subclasses included."""
    tables: list[Table] = []
    for sub in mapper.self_and_descendants:
        for table in sub.tables:
            if isinstance(table, Table) and table not in tables:
                tables.append(table)
    return tuple(tables)


def eager_dependencies(
    entity_mappers: list[Mapper[Any]], statement: Any
) -> tuple[set[Mapper[Any]], list[Table]]:
    """Mappers and tables reached by eager loads that run as separate statements.

    An over-approximation: mapper-level eager relationships, followed recursively, plus every
    relationship named by a loader option. Too many tables only costs early evictions.
    """
    mappers: set[Mapper[Any]] = set()
    tables: list[Table] = []
    todo: list[Mapper[Any]] = []
    for mapper in entity_mappers:
        todo.extend(mapper.self_and_descendants)
    for prop in _option_relationships(statement):
        _add_relationship(prop, tables)
        todo.append(prop.mapper)
    seen: set[Mapper[Any]] = set()
    while todo:
        mapper = todo.pop()
        if mapper in seen:
            continue
        seen.add(mapper)
        mappers.add(mapper)
        for table in mapper_tables(mapper):
            if table not in tables:
                tables.append(table)
        for prop in mapper.relationships:
            if prop.lazy in EAGER_STRATEGIES:
                _add_relationship(prop, tables)
                todo.extend(prop.mapper.self_and_descendants)
    return mappers, tables


def _add_relationship(prop: RelationshipProperty[Any], tables: list[Table]) -> None:
    for table in relationship_tables(prop):
        if table not in tables:
            tables.append(table)


_MAPPER_TABLES: dict[Mapper[Any], tuple[Table, ...]] = {}
_RELATIONSHIP_TABLES: dict[RelationshipProperty[Any], tuple[Table, ...]] = {}


def mapper_tables(mapper: Mapper[Any]) -> tuple[Table, ...]:
    """Every table loading an instance of `mapper` reads: its own, those its column properties
    read (a correlated subquery on a third table), and its `with_polymorphic` selectable's."""
    found = _MAPPER_TABLES.get(mapper)
    if found is None:
        out = [t for t in mapper.tables if isinstance(t, Table)]
        for prop in mapper.column_attrs:
            for column in prop.columns:
                out.extend(expression_tables(column))
        polymorphic = _sqla.polymorphic_selectable(mapper)
        if polymorphic is not None:
            out.extend(expression_tables(polymorphic))
        found = tuple(dict.fromkeys(out))
        _MAPPER_TABLES[mapper] = found
    return found


def relationship_tables(prop: RelationshipProperty[Any]) -> tuple[Table, ...]:
    """Every table loading a relationship reads: the target's (see `mapper_tables`), the
    association table, and any other table its primaryjoin/secondaryjoin name (EXISTS, IN)."""
    found = _RELATIONSHIP_TABLES.get(prop)
    if found is None:
        out: list[Table] = []
        for mapper in prop.mapper.self_and_descendants:
            out.extend(mapper_tables(mapper))
        if isinstance(prop.secondary, Table):
            out.append(prop.secondary)
        elif prop.secondary is not None:
            out.extend(expression_tables(prop.secondary))
        for join in (prop.primaryjoin, prop.secondaryjoin):
            if join is not None:
                out.extend(expression_tables(join))
        found = tuple(dict.fromkeys(out))
        _RELATIONSHIP_TABLES[prop] = found
    return found


def expression_tables(expression: Any) -> Iterator[Table]:
    """Tables an expression reads: those in it, and those of the columns it names."""
    for element in visitors.iterate(expression):
        if isinstance(element, Table):
            yield plain(element)
        elif isinstance(element, ColumnClause):
            table = getattr(element, "table", None)
            if isinstance(table, Table):
                yield plain(table)


def _option_relationships(statement: Any) -> Iterator[RelationshipProperty[Any]]:
    for option in _sqla.loader_options(statement):
        for element in getattr(option, "context", ()):
            path = getattr(element, "path", None)
            for token in getattr(path, "path", ()) or ():
                if isinstance(token, RelationshipProperty):
                    yield token


# -- mapped tables --------------------------------------------------------------------------------


class _MapperIndex:
    """Which mapper owns a table, refreshed when new mappers are configured.

    Applications (and their test suites, on purpose) may hold classes that failed to map or to
    configure; those are skipped here, never raised: they concern their own queries only.
    """

    def __init__(self) -> None:
        self._by_table: dict[Table, Mapper[Any]] = {}
        self._count = -1

    def _mappers(self) -> list[Mapper[Any]]:
        found: list[Mapper[Any]] = []
        for registry in _sqla.mapper_registries():
            for manager in _sqla.registry_class_managers(registry):
                if not getattr(manager, "is_mapped", False):
                    continue
                try:
                    mapper = manager.mapper
                except Exception:
                    continue
                if not _sqla.configure_failed(mapper):
                    found.append(mapper)
        return found

    def refresh(self) -> None:
        try:
            mappers = self._mappers()
        except Exception:  # a registry changing under us: keep the last index
            return
        if len(mappers) == self._count:
            return
        by_table: dict[Table, Mapper[Any]] = {}
        for mapper in mappers:
            table = getattr(mapper, "local_table", None)
            if not isinstance(table, Table):
                continue
            current = by_table.get(table)
            # single-table inheritance: the base mapper owns the table
            if current is None or (current.isa(mapper) and current is not mapper):
                by_table[table] = mapper
        self._by_table = by_table
        self._count = len(mappers)

    def mapper_for(self, table: Table | None) -> Mapper[Any] | None:
        if table is None:
            return None
        found = self._by_table.get(table)
        if found is None:
            self.refresh()
            found = self._by_table.get(table)
        return found

    def all_mappers(self) -> list[Mapper[Any]]:
        return self._mappers()


MAPPERS = _MapperIndex()


def mapper_for_table(table: Table | None) -> Mapper[Any] | None:
    return MAPPERS.mapper_for(table)
