"""Every private SQLAlchemy name the read path relies on, in one place.

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


def _hash_or_id(value: Any) -> int:
    try:
        return hash(value)
    except TypeError:
        return id(value)
