"""What a transaction wrote, as the cache sees it: tables, rows, and what cascades from them.

The write path (tracking) and manual invalidation (`cache.invalidate`) both describe their writes
as a `WriteSet`, and both follow the foreign keys declared in the metadata to the tables the
database changes by itself (`ON DELETE CASCADE`, `SET NULL`, ...), with the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table

_CASCADING = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})


@dataclass
class WriteSet:
    """What a (sub)transaction wrote, by table name (after schema translation)."""

    tables: set[str] = field(default_factory=set)  # DML ran: multi-row entries are stale
    table_wide: set[str] = field(default_factory=set)  # rows unknown: `get` entries are stale too
    rows: dict[str, set[str]] = field(default_factory=dict)  # table -> primary-key texts
    #: table -> primary keys as the values themselves (the cashews bridge's tags use `str()`)
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

    def add_table_wide(self, name: str) -> None:
        """Rows unknown (bulk DML, cascades, manual invalidation of a whole table)."""
        self.tables.add(name)
        self.table_wide.add(name)


_CASCADE_MEMO: dict[tuple[Table, str, frozenset[str] | None, int], list[Table]] = {}


def cascade_targets(table: Table, kind: str, updated: Iterable[str] | None) -> list[Table]:
    """Tables the database changes by itself, through foreign keys declared in the metadata."""
    if kind == "insert":
        return []
    updated_key = frozenset(updated) if updated is not None else None
    metadata = table.metadata
    memo_key = (table, kind, updated_key, len(metadata.tables))
    found = _CASCADE_MEMO.get(memo_key)
    if found is not None:
        return found
    out: list[Table] = []
    todo: list[tuple[Table, str, frozenset[str] | None]] = [(table, kind, updated_key)]
    seen: set[tuple[Table, str]] = set()
    while todo:
        parent, action_kind, columns = todo.pop()
        if (parent, action_kind) in seen:
            continue
        seen.add((parent, action_kind))
        for child in metadata.tables.values():
            for fk in child.foreign_keys:
                try:
                    referenced = fk.column
                except Exception:
                    continue
                if referenced.table is not parent:
                    continue
                action = (fk.ondelete if action_kind == "delete" else fk.onupdate) or ""
                if action.upper() not in _CASCADING:
                    continue
                if (
                    action_kind == "update"
                    and columns is not None
                    and referenced.key not in columns
                ):
                    continue
                if child not in out:
                    out.append(child)
                if action_kind == "delete" and action.upper() == "CASCADE":
                    todo.append((child, "delete", None))
                else:
                    todo.append((child, "update", frozenset({fk.parent.key})))
    _CASCADE_MEMO[memo_key] = out
    return out
