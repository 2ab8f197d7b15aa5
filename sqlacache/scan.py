"""Scanning a statement for what forbids caching it whatever its model: SQL text that may read
tables nobody can see, volatile functions (`now()`, `random()`), data-modifying CTEs.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement


def bypass_reason(core: Any, volatile: frozenset[str]) -> str | None:
    """Why the compiled statement `core` may never be cached, or None."""
    return _scan(core, volatile) or ("dml_cte" if _writes_in_a_cte(core) else None)


def _scan(core: Any, volatile: frozenset[str]) -> str | None:
    """Reasons found anywhere in the statement: raw text fragments, volatile functions.

    A volatile function is found whether the statement calls it through `func` or writes it in
    a SQL text fragment (`literal_column("random()")`, `text()` in a column or a clause). Of the
    fragments without one, a `text()` is still never cached: it is SQLAlchemy's way to write a
    whole clause (`select_from(text(...))`, a subquery), so it may read tables nobody can see.
    A literal column cannot be a FROM, so it reads nothing unless it holds a subquery: one that
    shows no sign of one (`literal_column("1")`, `literal_column("a + 1")`) is cached.
    """
    pattern = _volatile_pattern(volatile)
    reason: str | None = None
    for element in visitors.iterate(core):
        if isinstance(element, TextClause):
            if pattern.search(element.text):
                return "volatile_function"
            reason = "text"
        elif isinstance(element, ColumnClause) and element.is_literal:
            if pattern.search(element.name):
                return "volatile_function"
            if _READS_RELATIONS.search(element.name):
                reason = "text"
        elif isinstance(element, FunctionElement):
            name = getattr(element, "name", "") or type(element).__name__
            if str(name).lower() in volatile or type(element).__name__ == "next_value":
                return "volatile_function"
    return reason


#: SQL keywords by which a text fragment could reach a table
_READS_RELATIONS = re.compile(
    r"(?<![\w$])(select|from|join|table|values|with|lateral|into|update|delete|insert)(?![\w$])",
    re.IGNORECASE,
)

#: volatile functions that SQL lets one write without parentheses
_PARENLESS = frozenset(
    {
        "current_timestamp",
        "current_date",
        "current_time",
        "current_user",
        "current_role",
        "current_schema",
        "current_catalog",
        "session_user",
        "system_user",
        "user",
        "localtime",
        "localtimestamp",
        "sysdate",
        "utc_timestamp",
    }
)


@functools.lru_cache(maxsize=16)
def _volatile_pattern(volatile: frozenset[str]) -> re.Pattern[str]:
    """Calls `name(` of any volatile function, and the bare words of the parenthesis-less ones."""
    names = sorted(volatile, key=len, reverse=True)
    calls = "|".join(re.escape(n) for n in names) or "(?!)"
    bare = "|".join(re.escape(n) for n in names if n in _PARENLESS) or "(?!)"
    return re.compile(rf"(?<![\w$])(?:(?:{calls})\s*\(|(?:{bare})(?![\w$]))", re.IGNORECASE)


def _writes_in_a_cte(core: Any) -> bool:
    return any(isinstance(element, UpdateBase) for element in visitors.iterate(core))
