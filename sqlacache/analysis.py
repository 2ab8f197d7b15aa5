"""Statement analysis: what a SELECT is (op, model), what it reads, and whether it may be cached.

Everything here depends only on the statement's shape, so it is computed once per SQLAlchemy
`CacheKey` structure and dialect and memoised as a `Plan`; the hit path only reads the plan.
What forbids caching any statement is found by `scan`; its result's shape by `result_shape`.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    Label,
    TextClause,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Exists, Select, TextualSelect

from . import _sqla
from .keys import UnstableValue, digest
from .mapped import eager_dependencies, entity_tables, mapper_for_table, plain
from .result_shape import ResultShape, describe_options, describe_result, result_shape
from .scan import bypass_reason

# -- the plan ------------------------------------------------------------------------------------


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
    reason = bypass_reason(core, volatile)
    if reason:
        return bypass(reason)
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
