"""Every private SQLAlchemy name sqlacache relies on, in one place.

SQLAlchemy offers no public API for these; each accessor is pinned by tests/test_sqla_private.py,
which fails with a message naming the attribute when a SQLAlchemy release changes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState, Session

#: `session.info` flag of the sessions the cache opens for itself (see `read_beside`)
CACHE_OWN_SESSION = "sqlacache.own_session"


def statement_cache_key(statement: Any) -> Any:
    """SQLAlchemy's own statement cache key (None when the statement has none)."""
    generate = getattr(statement, "_generate_cache_key", None)
    return None if generate is None else generate()


def bind_execution_options(bind: Any) -> Mapping[str, Any]:
    """The execution options of an Engine, an option engine (`engine.execution_options(...)`) or
    a Connection, with the engine's own underneath."""
    options: Mapping[str, Any] = getattr(bind, "_execution_options", None) or {}
    return options


def listeners_after(state: ORMExecuteState) -> list[Callable[[ORMExecuteState], Any]]:
    """The `do_orm_execute` listeners that run after the current one for this execution."""
    return list(state._remaining_events())


def run_listeners_after(state: ORMExecuteState) -> tuple[Result[Any] | None, bool]:
    """Run the listeners after the current one now, as SQLAlchemy would after it returns None.

    Returns what one of them returned (a Result ends the execution, as in SQLAlchemy) and whether
    any ran. Once they ran, the execution must go on through `state.invoke_statement()`, which then
    skips them, never by returning None (SQLAlchemy would run them a second time).
    """
    later: list[Any] = state._remaining_events()
    if not later:
        return None, False
    start = state._starting_event_idx
    for offset, listener in enumerate(later, start=1):
        state._starting_event_idx = start + offset
        result = listener(state)
        if result:
            return result, True
    state._starting_event_idx = len(state._events_todo) - 1
    return None, True


def is_eager_loader_statement(load_options: Any) -> bool:
    """A selectin/subquery eager loader's statement, run inside a larger load."""
    return getattr(load_options, "_sa_top_level_orm_context", None) is not None


def populates_existing(load_options: Any) -> bool:
    return bool(load_options._populate_existing)


def yields_per(load_options: Any) -> bool:
    return bool(load_options._yield_per)


def identity_token(load_options: Any) -> Any:
    return load_options._identity_token


def only_return_tuples(load_options: Any) -> bool:
    return bool(load_options._only_return_tuples)


def invokes_all_eagers(load_options: Any) -> bool:
    return bool(load_options._invoke_all_eagers)


def autoflushes(session: Session, load_options: Any) -> bool:
    return bool(session.autoflush and load_options._autoflush)


def autoflush(session: Session) -> None:
    """Flush pending changes as the ORM does before a query (it may write other tables)."""
    session._autoflush()


def has_pending_changes(session: Session) -> bool:
    """Cheaply: does the session hold new, deleted or modified objects?"""
    return bool(
        getattr(session, "_new", None)
        or getattr(session, "_deleted", None)
        or getattr(session.identity_map, "_modified", None)
    )


def copy_unique_filter(target: Result[Any], source: Result[Any]) -> None:
    """Give `target` the uniquing rule of `source` (joined eager loads of collections)."""
    target._unique_filter_state = source._unique_filter_state


def read_beside(state: ORMExecuteState) -> tuple[Result[Any], Session]:
    """Run the statement in a session of the cache's own, on the caller's connection (so in its
    transaction), with the listeners after the current one skipped as `invoke_statement` does.

    The result's objects are built from the rows the database returned, whatever the caller's
    session already holds. The caller closes the returned session.
    """
    connection = state.session.connection(bind_arguments=dict(state.bind_arguments))
    own = Session(bind=connection, autoflush=False, expire_on_commit=False)
    own.info[CACHE_OWN_SESSION] = True
    bind_arguments = dict(state.bind_arguments)
    bind_arguments["_sa_skip_events"] = True
    try:
        result = own._execute_internal(
            state.statement,
            state.parameters,
            execution_options=state.local_execution_options,
            bind_arguments=bind_arguments,
            _parent_execute_state=state,
        )
    except BaseException:
        own.close()
        raise
    return result, own


def orm_row_metadata(labels: list[Any], extra: list[Any], entities: list[Any]) -> Any:
    """The metadata an ORM result carries, uniquing rules included: `result.unique()` on a hit
    must dedupe entities by identity (as the ORM does), not by their own `__hash__`, which a model
    may not have."""
    from sqlalchemy.engine.result import SimpleResultMetaData

    filters = [
        id
        if getattr(entity, "use_id_for_hash", False)
        else _hash_or_id
        if getattr(entity, "_non_hashable_value", False)
        or getattr(entity, "_null_column_type", False)
        else None
        for entity in entities
    ]
    try:  # SQLAlchemy 2.1
        return SimpleResultMetaData(labels, extra, _create_unique_filters=lambda result: filters)
    except TypeError:  # 2.0
        return SimpleResultMetaData(labels, extra, _unique_filters=filters)  # type: ignore[call-arg]


# -- statements: what analysis reads of a SELECT's shape -------------------------------------------


def raw_columns(select: Any) -> list[Any]:
    """The SELECT's columns as written (`select(User)`: one, the entity), before the ORM expands
    them: `get` is a SELECT of exactly one whole entity."""
    return list(select._raw_columns)


def where_criteria(select: Any) -> tuple[Any, ...]:
    """The WHERE clause's criteria, one per `.where()`/`.filter()` call (ANDed)."""
    return tuple(select._where_criteria)


def joins_groups_or_having(select: Any) -> bool:
    """Whether the SELECT has explicit joins, GROUP BY or HAVING: none of these can be a `get`."""
    return bool(select._setup_joins or select._group_by_clauses or select._having_criteria)


def locks_rows(statement: Any) -> bool:
    """`FOR UPDATE` / `FOR SHARE` (`with_for_update()`) on the statement or one of its selects."""
    if getattr(statement, "_for_update_arg", None) is not None:
        return True
    return any(
        getattr(s, "_for_update_arg", None) is not None for s in getattr(statement, "selects", ())
    )


def loader_options(statement: Any) -> tuple[Any, ...]:
    """The statement's loader options (`.options(selectinload(...))`), in order."""
    return tuple(getattr(statement, "_with_options", ()))


def order_by_clauses(statement: Any) -> tuple[Any, ...] | None:
    """The statement's ORDER BY clauses; None for a statement that cannot have any."""
    clauses = getattr(statement, "_order_by_clauses", None)
    return None if clauses is None else tuple(clauses)


def update_values(statement: Any) -> list[Any]:
    """What an UPDATE's `.values()` / `.ordered_values()` set: a mapping or (column, value) pairs
    each, empty ones left out. The columns an UPDATE changes decide its foreign-key cascades."""
    return [
        source
        for source in (
            getattr(statement, "_values", None),
            getattr(statement, "_ordered_values", None),
        )
        if source
    ]


def plain_table(table: Any) -> Any:
    """The Table itself: ORM statements hold annotated copies that neither equal nor hash like it."""
    return table._deannotate() if table._annotations else table


# -- compiled statements: the shape of the result the ORM builds ---------------------------------


def orm_entities(compile_state: Any) -> list[Any] | None:
    """The ORM compile state's result entities (one per result column); None for a Core one."""
    entities = getattr(compile_state, "_entities", None)
    return None if entities is None else list(entities)


def entity_label(entity: Any) -> Any:
    """The name of an ORM result entity's column in the result's rows (None for some)."""
    return entity._label_name


def entity_extra_objects(entity: Any) -> tuple[Any, ...]:
    """The objects by which a result column of an ORM entity can also be looked up."""
    return tuple(getattr(entity, "_extra_entities", ()))


def has_mapper_entities(compile_state: Any) -> bool:
    """Whether the ORM filters the result's rows (an entity among its columns)."""
    return bool(getattr(compile_state, "_has_mapper_entities", False))


def compiled_result_columns(compiled: Any) -> list[tuple[Any, ...]]:
    """A compiled Core SELECT's result columns: (key name, name, objects, type) each."""
    return list(getattr(compiled, "_result_columns", None) or ())


# -- results and sessions: what a hit builds without running SQL ---------------------------------


def shape_result(
    result: Result[Any], *, filtered: bool, single_entity: bool, unique_filter: Any
) -> None:
    """Give a Result built from rows the flags of an ORM result: `filtered` (an entity among its
    columns), `is_single_entity` (so `.scalars()` and a legacy `Query` see objects), and the
    uniquing rule (None for none) of joined eager loads of collections."""
    result._attributes = result._attributes.union(
        {"filtered": filtered, "is_single_entity": single_entity}
    )
    result._source_supports_scalars = single_entity
    if unique_filter is not None:
        result._unique_filter_state = unique_filter


def identity_class(mapper: Any) -> type:
    """The class an identity key names (a base mapper's, for inheritance): building the key as
    `Mapper.identity_key_from_primary_key` does, without its per-call overhead."""
    cls: type = mapper._identity_class
    return cls


def add_to_identity_map(identity_map: Any) -> Callable[[Any, Any], Any]:
    """`add(state, key)`: put a state the identity map does not hold yet into it, as a load does."""
    add: Callable[[Any, Any], Any] = identity_map._add_unpresent
    return add


def commit_loaded(state: Any, identity_map: Any) -> None:
    """Mark everything a freshly built object holds as loaded and unchanged, as a load does."""
    state._commit_all(state.dict, identity_map)


def commit_attributes(state: Any, dict_: Any, keys: list[str]) -> None:
    """Mark the attributes `keys` of a persistent object loaded and unchanged."""
    state._commit(dict_, keys)


def is_mapped_class(cls: type) -> bool:
    """Whether instances of `cls` are mapped objects (cheaper than `inspect()` per type)."""
    return hasattr(cls, "_sa_class_manager")


# -- engines and connections ----------------------------------------------------------------------

#: the key SQLAlchemy stores a `schema_translate_map`'s None key under, in the map itself, from
#: its first execution on
SCHEMA_MAP_NONE_KEY = "_none"


def connect_isolation_level(dialect: Any) -> Any:
    """The isolation level the engine's `isolation_level=` sets on every new connection, if any."""
    return getattr(dialect, "_on_connect_isolation_level", None)


# -- the mapping: every mapper of every registry ----------------------------------------------------


def mapper_registries() -> list[Any]:
    """Every live `registry` (declarative bases and imperative registries)."""
    from sqlalchemy.orm.mapper import _mapper_registries

    return list(_mapper_registries)


def registry_class_managers(registry: Any) -> list[Any]:
    """The class managers of a registry: unlike `registry.mappers` this does not raise for a
    class whose mapping failed half way."""
    return list(getattr(registry, "_managers", ()))


def configure_failed(mapper: Any) -> bool:
    """Whether configuring this mapper failed (its queries raise; it owns no table for us)."""
    return bool(getattr(mapper, "_configure_failed", False))


def polymorphic_selectable(mapper: Any) -> Any:
    """The selectable `with_polymorphic` loads instances from (None without one)."""
    return getattr(mapper, "_with_polymorphic_selectable", None)


def _hash_or_id(value: Any) -> int:
    try:
        return hash(value)
    except TypeError:
        return id(value)
