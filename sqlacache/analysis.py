"""Statement analysis: what a SELECT is (op, model), what it reads, and whether it may be cached.

Everything here depends only on the statement's shape, so it is computed once per SQLAlchemy
`CacheKey` structure and dialect and memoised as a `Plan`; the hit path only reads the plan.
"""

from __future__ import annotations

import functools
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
    Label,
    TextClause,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Exists, Select, TextualSelect

from . import _sqla
from .keys import UnstableValue, canonical, digest
from .mapped import eager_dependencies, entity_tables, mapper_for_table, plain

# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultShape:
    """What the ORM's result object looks like, so a hit can build the same one without SQL."""

    metadata: SimpleResultMetaData
    single_entity: bool
    filtered: bool
    requires_unique: bool


@dataclass(frozen=True)
class PkParam:
    """Where to find one primary-key value of a `get` statement among its parameters."""

    key: str
    index: int
    python_type: type | None


@dataclass
class Plan:
    """Everything known about a statement shape."""

    bypass: str | None  # a reason when the shape can never be cached
    op: str = "fetch"
    model: Mapper[Any] | None = None
    tables: tuple[Table, ...] = ()
    row_tables: tuple[Table, ...] = ()  # get: the tables a row of the entity lives in
    pk_params: tuple[PkParam, ...] = ()
    sql_digest: str = ""
    shape: ResultShape | None = None
    #: Mappers whose instances may appear in a result (the thaw refuses any other class).
    mappers: frozenset[Mapper[Any]] = frozenset()
    _table_set: frozenset[Table] = field(default=frozenset(), repr=False)
    #: the mappers by dotted class name, as payloads name them
    mappers_by_name: dict[str, Mapper[Any]] = field(default_factory=dict, repr=False)
    #: per (database, schema map): the key names this plan reads (see hooks.KeySet)
    keysets: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._table_set = frozenset(self.tables)
        self.mappers_by_name = {
            f"{m.class_.__module__}.{m.class_.__qualname__}": m for m in self.mappers
        }

    @property
    def table_set(self) -> frozenset[Table]:
        return self._table_set

    @property
    def other_tables(self) -> tuple[Table, ...]:
        """Tables a `get` reads besides its own row (eager loads)."""
        rows = set(self.row_tables)
        return tuple(t for t in self.tables if t not in rows)

    def with_more(self, tables: Iterable[Table], mappers: Iterable[Mapper[Any]]) -> Plan:
        """A copy that also depends on `tables` (learned from a result); see `snapshot`."""
        merged = tuple(dict.fromkeys((*self.tables, *tables)))
        return Plan(
            bypass=self.bypass,
            op=self.op,
            model=self.model,
            tables=merged,
            row_tables=self.row_tables,
            pk_params=self.pk_params,
            sql_digest=self.sql_digest,
            shape=self.shape,
            mappers=self.mappers | frozenset(mappers),
        )

    def with_result_metadata(self, metadata: Any) -> Plan:
        """A copy whose hits build their Result with `metadata`, taken from a real result: the
        ORM names some columns (legacy `Query` aggregates) only when it runs the statement."""
        assert self.shape is not None
        shape = ResultShape(
            metadata=metadata,
            single_entity=self.shape.single_entity,
            filtered=self.shape.filtered,
            requires_unique=self.shape.requires_unique,
        )
        return replace(self, shape=shape, keysets={})


def uncacheable(reason: str) -> Plan:
    return Plan(bypass=reason)


# -- memo ----------------------------------------------------------------------------------------


class PlanCache:
    """An LRU of plans keyed by the statement's cache-key structure, per dialect."""

    def __init__(self, dialect: Dialect, volatile: frozenset[str], size: int = 2000) -> None:
        self.dialect = dialect
        self.volatile = volatile
        self._size = size
        self._plans: OrderedDict[Any, Plan] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Plan | None:
        return self._plans.get(key)

    def put(self, key: Any, plan: Plan) -> None:
        with self._lock:
            self._plans[key] = plan
            if len(self._plans) > self._size:
                self._plans.popitem(last=False)

    def plan_for(self, statement: Any, cache_key: Any) -> Plan:
        plan = self._plans.get(cache_key.key)
        if plan is None:
            plan = analyse(statement, cache_key, self.dialect, self.volatile)
            self.put(cache_key.key, plan)
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


# -- analysis ------------------------------------------------------------------------------------


def analyse(statement: Any, cache_key: Any, dialect: Dialect, volatile: frozenset[str]) -> Plan:
    """Build the plan of one statement shape."""
    if isinstance(statement, (TextClause, TextualSelect)) or _is_from_statement(statement):
        return uncacheable("text")
    if not isinstance(statement, (Select, CompoundSelect)):
        return uncacheable("not_select")
    entity_mappers = _entity_mappers(statement)
    model = entity_mappers[0] if entity_mappers else mapper_for_table(_first_table(statement))
    op = classify(statement, entity_mappers)

    def bypass(reason: str) -> Plan:  # counted under the statement's model and op
        return Plan(bypass=reason, op=op, model=model)

    if model is None:
        return uncacheable("unmapped")
    if _sqla.locks_rows(statement):
        return bypass("for_update")
    try:
        compiled = statement.compile(dialect=dialect)
    except Exception:  # a statement the dialect cannot compile is not ours to cache
        return bypass("uncompilable")
    compile_state = getattr(compiled, "compile_state", None)
    core = getattr(compile_state, "statement", None)
    if core is None:
        core = statement
    reason = _scan(core, volatile)
    if reason:
        return bypass(reason)
    if any(_scan_cte_dml(core)):
        return bypass("dml_cte")
    try:
        options_text = describe_options(statement)
    except UnstableValue:
        return bypass("options")

    read_tables = list(dict.fromkeys(_tables_in(core)))
    eager_mappers, eager_tables = eager_dependencies(entity_mappers, statement)
    tables = tuple(dict.fromkeys((*read_tables, *eager_tables)))
    pk_params: tuple[PkParam, ...] = ()
    row_tables: tuple[Table, ...] = ()
    if op == "get":
        assert isinstance(statement, Select)  # classify() says "get" only for a Select
        found = _pk_params(statement, model, cache_key)
        if found is None:
            op = "fetch"
        else:
            pk_params = found
            row_tables = entity_tables(model)
            tables = tuple(dict.fromkeys((*row_tables, *tables)))

    shape = result_shape(compiled, compile_state, statement)
    if shape is None:
        return bypass("result_shape")
    mappers = frozenset(
        m for base in (*entity_mappers, *eager_mappers) for m in base.self_and_descendants
    )
    return Plan(
        bypass=None,
        op=op,
        model=model,
        tables=tables,
        row_tables=row_tables,
        pk_params=pk_params,
        sql_digest=digest(str(compiled), options_text, describe_result(statement)),
        shape=shape,
        mappers=mappers,
    )


def _is_from_statement(statement: Any) -> bool:
    return type(statement).__name__ == "FromStatement"


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


def _scan_cte_dml(core: Any) -> Iterator[bool]:
    from sqlalchemy.sql.dml import UpdateBase

    for element in visitors.iterate(core):
        if isinstance(element, UpdateBase):
            yield True


def _tables_in(core: Any) -> Iterator[Table]:
    for element in visitors.iterate(core):
        if isinstance(element, Table):
            yield plain(element)


def _first_table(statement: Any) -> Table | None:
    """The first table reached walking the FROMs left to right, into joins, subqueries, EXISTS."""
    if isinstance(statement, CompoundSelect):
        return _first_table(statement.selects[0]) if statement.selects else None
    froms = list(statement.get_final_froms())
    for item in (*froms, *statement.selected_columns):
        for element in visitors.iterate(item):
            if isinstance(element, Table):
                return plain(element)
    return None


def _entity_mappers(statement: Any) -> list[Mapper[Any]]:
    """Mapped entities in `column_descriptions` order (the first one is the statement's model)."""
    try:
        descriptions = statement.column_descriptions
    except Exception:
        return []
    found: list[Mapper[Any]] = []
    for desc in descriptions:
        entity = desc.get("entity")
        if entity is None:
            continue
        info = inspect(entity, raiseerr=False)
        mapper = getattr(info, "mapper", None)
        if mapper is not None and mapper not in found:
            found.append(mapper)
    return found


def classify(statement: Any, entity_mappers: list[Mapper[Any]]) -> str:
    """The op, decided in the order exists > count > get > fetch (get is confirmed by `_pk_params`)."""
    columns = [_unlabel(c) for c in statement.selected_columns]
    if len(columns) == 1 and isinstance(columns[0], Exists):
        return "exists"
    if columns and all(_is_count(c) for c in columns):
        return "count"
    if (
        isinstance(statement, Select)
        and len(_sqla.raw_columns(statement)) == 1
        and len(entity_mappers) == 1
        and _is_whole_entity(statement)
        and not _sqla.joins_groups_or_having(statement)
        and _sqla.where_criteria(statement)
    ):
        return "get"
    return "fetch"


def _unlabel(column: Any) -> Any:
    while isinstance(column, Label):
        column = column.element
    return column


def _is_count(column: Any) -> bool:
    return (
        isinstance(column, FunctionElement) and str(getattr(column, "name", "")).lower() == "count"
    )


def _is_whole_entity(statement: Select[Any]) -> bool:
    desc = statement.column_descriptions[0]
    entity = desc.get("entity")
    return entity is not None and desc.get("expr") is entity


def _pk_params(
    statement: Select[Any], mapper: Mapper[Any], cache_key: Any
) -> tuple[PkParam, ...] | None:
    """If the WHERE is only `=` on every primary-key column, where each value comes from."""
    criteria: list[Any] = []
    for criterion in _sqla.where_criteria(statement):
        criteria.extend(_flatten_and(criterion))
    pk_props = [mapper.get_property_by_column(col) for col in mapper.primary_key]
    found: dict[int, PkParam] = {}
    bindparams = cache_key.bindparams
    for criterion in criteria:
        if not isinstance(criterion, BinaryExpression) or criterion.operator is not operators.eq:
            return None
        column, param = criterion.left, criterion.right
        if isinstance(column, BindParameter):
            column, param = param, column
        if not isinstance(param, BindParameter) or getattr(column, "table", None) is None:
            return None
        try:
            prop = mapper.get_property_by_column(column)
        except Exception:
            return None
        if prop not in pk_props:
            return None
        position = pk_props.index(prop)
        index = next((i for i, bp in enumerate(bindparams) if bp is param), -1)
        found[position] = PkParam(key=param.key, index=index, python_type=_python_type(column))
    if len(found) != len(pk_props) or len(criteria) != len(pk_props):
        return None
    return tuple(found[i] for i in range(len(pk_props)))


def _flatten_and(criterion: Any) -> list[Any]:
    if isinstance(criterion, BooleanClauseList) and criterion.operator is operators.and_:
        out: list[Any] = []
        for clause in criterion.clauses:
            out.extend(_flatten_and(clause))
        return out
    return [criterion]


def _python_type(column: Any) -> type | None:
    try:
        return column.type.python_type
    except (NotImplementedError, AttributeError):
        return None


def coerce_pk(value: Any, python_type: type | None) -> Any:
    """Bring a `get` parameter to the type the flushed row will have, so both name one row key."""
    if python_type is None or value is None or type(value) is python_type:
        return value
    if python_type is uuid.UUID:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    if python_type is int and isinstance(value, str):
        return int(value)
    return value


def describe_result(statement: Any) -> str:
    """What each result column is, as text identical in every process.

    Two statements can render the same SQL and still return different things: an entity, its
    columns, a `Bundle` of them, another class mapped to the same table. Their entries must
    differ.
    """
    try:
        descriptions = statement.column_descriptions
    except Exception:
        return ""
    parts = []
    for desc in descriptions:
        entity, expr = desc.get("entity"), desc.get("expr")
        info = inspect(entity, raiseerr=False) if entity is not None else None
        mapper = getattr(info, "mapper", None)
        owner = "" if mapper is None else mapper_name_of(mapper)
        kind = "entity" if expr is entity and entity is not None else type(expr).__name__
        parts.append(f"{desc.get('name')}:{kind}:{owner}:{int(bool(desc.get('aliased')))}")
    return ";".join(parts)


def mapper_name_of(mapper: Mapper[Any]) -> str:
    return f"{mapper.class_.__module__}.{mapper.class_.__qualname__}"


def describe_options(statement: Any) -> str:
    """Loader options as text that is identical in every process (no memory addresses)."""
    parts: list[str] = []
    for option in _sqla.loader_options(statement):
        kind = type(option)
        if not kind.__module__.startswith("sqlalchemy."):
            raise UnstableValue(kind.__qualname__)
        parts.append(kind.__qualname__)
        for element in getattr(option, "context", ()):
            parts.append(_describe_load_element(element))
    return ";".join(parts)


def _describe_load_element(element: Any) -> str:
    path = getattr(element, "path", None)
    tokens: list[str] = []
    for token in getattr(path, "path", ()) or ():
        if isinstance(token, Mapper):
            tokens.append(f"{token.class_.__module__}.{token.class_.__qualname__}")
        elif hasattr(token, "key") and hasattr(token, "parent"):
            tokens.append(str(token.key))
        elif isinstance(token, str):
            tokens.append(token)
        else:
            info = inspect(token, raiseerr=False)
            if getattr(info, "is_aliased_class", False) and getattr(info, "name", None):
                tokens.append(f"aliased:{info.mapper.class_.__qualname__}:{info.name}")
            else:
                raise UnstableValue(type(token).__qualname__)
    strategy = getattr(element, "strategy", None)
    local_opts = getattr(element, "local_opts", None) or {}
    opts = ",".join(
        f"{k}={canonical(v)}" for k, v in sorted(local_opts.items(), key=lambda kv: str(kv[0]))
    )
    return f"{type(element).__name__}[{'/'.join(tokens)}]{strategy!r}{{{opts}}}"


# -- the result's shape --------------------------------------------------------------------------


def result_shape(compiled: Any, compile_state: Any, statement: Any) -> ResultShape | None:
    entities = _sqla.orm_entities(compile_state)
    if entities:
        labels = [_sqla.entity_label(e) for e in entities]
        extra: list[Any] = [_sqla.entity_extra_objects(e) for e in entities]
        single = len(entities) == 1 and bool(entities[0].supports_single_entity)
        return ResultShape(
            metadata=_sqla.orm_row_metadata(labels, extra, entities),
            single_entity=single,
            filtered=_sqla.has_mapper_entities(compile_state),
            requires_unique=bool(getattr(compile_state, "multi_row_eager_loaders", False)),
        )
    result_columns = _sqla.compiled_result_columns(compiled)
    if not result_columns:
        return None
    labels = [rc[0] for rc in result_columns]
    extra = [tuple(rc[2]) for rc in result_columns]
    return ResultShape(
        metadata=SimpleResultMetaData(labels, extra),
        single_entity=False,
        filtered=False,
        requires_unique=False,
    )
