"""Pins every private SQLAlchemy name sqlacache relies on (sqlacache/_sqla.py).

When a SQLAlchemy release renames or changes one, the test that fails names it, before a user
meets a cache that silently stops caching or serves the wrong thing.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, inspect, select, text, update
from sqlalchemy.engine import IteratorResult
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import instance_state

from sqlacache import _sqla
from tests.models import Base, Employee, Manager, Order, User


@pytest.fixture
def seen() -> Any:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, name="a"))
        s.add(Order(id=1, user_id=1))
        s.commit()
    states: list[Any] = []

    def record(state: Any) -> None:
        states.append(
            {
                "key": _sqla.statement_cache_key(state.statement),
                "later": _sqla.listeners_after(state),
                "eager": _sqla.is_eager_loader_statement(state.load_options),
                "populate": _sqla.populates_existing(state.load_options),
                "yield_per": _sqla.yields_per(state.load_options),
                "token": _sqla.identity_token(state.load_options),
                "tuples": _sqla.only_return_tuples(state.load_options),
                "eagers": _sqla.invokes_all_eagers(state.load_options),
                "autoflush": _sqla.autoflushes(state.session, state.load_options),
                "pending": _sqla.has_pending_changes(state.session),
                "bind_options": _sqla.bind_execution_options(
                    state.session.get_bind(**state.bind_arguments)
                ),
            }
        )

    def after(state: Any) -> None:
        states.append({"after": True})

    event.listen(Session, "do_orm_execute", record)
    event.listen(Session, "do_orm_execute", after)
    try:
        yield engine, states
    finally:
        event.remove(Session, "do_orm_execute", record)
        event.remove(Session, "do_orm_execute", after)


def test_load_options_and_session_state_are_readable(seen: Any) -> None:
    engine, states = seen
    with Session(engine) as s:
        s.add(User(id=2, name="pending"))
        s.execute(
            select(User).execution_options(populate_existing=True, yield_per=5, identity_token="t")
        ).all()
    state = states[0]
    assert state["key"] is not None, "Select._generate_cache_key"
    assert state["populate"] is True, "QueryContext.default_load_options._populate_existing"
    assert state["yield_per"] is True, "load_options._yield_per"
    assert state["token"] == "t", "load_options._identity_token"
    assert state["pending"] is True, "Session._new"
    assert state["autoflush"] is True, "Session.autoflush / load_options._autoflush"
    assert state["tuples"] is False and state["eagers"] is True, "load_options flags"


def test_eager_loader_statements_are_recognised(seen: Any) -> None:
    engine, states = seen
    with Session(engine) as s:
        s.scalars(select(User).options(selectinload(User.orders))).all()
    flags = [st["eager"] for st in states if "eager" in st]
    assert flags[0] is False and flags[1:] and all(flags[1:]), (
        "load_options._sa_top_level_orm_context marks a selectin loader's statement"
    )


def test_listeners_after_the_current_one_are_listed_and_run_once(seen: Any) -> None:
    engine, states = seen
    with Session(engine) as s:
        s.get(User, 1)
    assert len(states[0]["later"]) >= 1, "ORMExecuteState._remaining_events()"

    ran: list[str] = []

    def first(state: Any) -> Any:
        ran.append("first")
        _, went_on = _sqla.run_listeners_after(state)
        assert went_on, "ORMExecuteState._starting_event_idx / _events_todo"
        return state.invoke_statement()

    def second(state: Any) -> None:
        ran.append("second")

    event.listen(Session, "do_orm_execute", first, insert=True)
    event.listen(Session, "do_orm_execute", second)
    try:
        with Session(engine) as s:
            assert s.execute(select(User.name)).scalar() == "a"
    finally:
        event.remove(Session, "do_orm_execute", first)
        event.remove(Session, "do_orm_execute", second)
    assert ran == ["first", "second"], "a listener run early must not run again"


def test_option_engines_carry_their_execution_options() -> None:
    engine = create_engine("sqlite://")
    tenant = engine.execution_options(schema_translate_map={None: "tenant_a"})
    assert _sqla.bind_execution_options(tenant)["schema_translate_map"] == {None: "tenant_a"}, (
        "Engine._execution_options"
    )
    with tenant.connect() as conn:
        options = _sqla.bind_execution_options(conn)
        assert options["schema_translate_map"] == {None: "tenant_a"}, (
            "Connection._execution_options"
        )


def test_unique_filter_can_be_copied() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        source = s.execute(select(User)).unique()
        target = s.execute(select(User))
        _sqla.copy_unique_filter(target, source)
        assert target._unique_filter_state is source._unique_filter_state, (
            "Result._unique_filter_state"
        )


# -- statements -------------------------------------------------------------------------------------


def test_a_selects_clauses_are_readable() -> None:
    plain = select(User).where(User.id == 1).where(User.name == "a")
    assert len(_sqla.raw_columns(plain)) == 1, "Select._raw_columns"
    assert len(_sqla.where_criteria(plain)) == 2, "Select._where_criteria"
    assert not _sqla.joins_groups_or_having(plain)
    assert _sqla.joins_groups_or_having(select(User).join(User.orders)), "Select._setup_joins"
    grouped = select(User).group_by(User.id)
    assert _sqla.joins_groups_or_having(grouped), "Select._group_by_clauses"
    having = select(User.name).group_by(User.name).having(func.count() > 1)
    assert _sqla.joins_groups_or_having(having), "Select._having_criteria"


def test_locks_loader_options_and_order_are_readable() -> None:
    assert _sqla.locks_rows(select(User).with_for_update()), "Select._for_update_arg"
    assert not _sqla.locks_rows(select(User))
    options = _sqla.loader_options(select(User).options(selectinload(User.orders)))
    assert len(options) == 1, "Executable._with_options"
    assert _sqla.order_by_clauses(select(User).order_by(User.id)), "Select._order_by_clauses"
    assert _sqla.order_by_clauses(select(User)) == (), "Select._order_by_clauses"
    assert _sqla.order_by_clauses(text("select 1")) is None


def test_what_an_update_sets_is_readable() -> None:
    for statement in (
        update(User).values(name="x"),
        update(User).ordered_values((User.name, "x")),
    ):
        sources = _sqla.update_values(statement)
        assert sources, "UpdateBase._values / Update._ordered_values"
        keys = [
            k
            for source in sources
            for k in (source.keys() if hasattr(source, "keys") else (k for k, _ in source))
        ]
        assert [getattr(k, "key", k) for k in keys] == ["name"]


def test_annotated_tables_are_made_plain() -> None:
    annotated = update(User).table
    assert annotated is not User.__table__
    assert _sqla.plain_table(annotated) is User.__table__, "ClauseElement._annotations/_deannotate"
    assert _sqla.plain_table(User.__table__) is User.__table__


# -- compiled statements ---------------------------------------------------------------------------


def test_an_orm_compile_states_entities_are_readable() -> None:
    dialect = create_engine("sqlite://").dialect
    compiled = select(User, User.name).compile(dialect=dialect)
    state = compiled.compile_state
    entities = _sqla.orm_entities(state)
    assert entities is not None and len(entities) == 2, "ORMSelectCompileState._entities"
    assert [_sqla.entity_label(e) for e in entities] == ["User", "name"], "_label_name"
    assert _sqla.entity_extra_objects(entities[0]) == (User,), "_MapperEntity._extra_entities"
    assert _sqla.has_mapper_entities(state), "ORMSelectCompileState._has_mapper_entities"
    assert not _sqla.has_mapper_entities(select(User.name).compile(dialect=dialect).compile_state)


def test_a_core_selects_result_columns_are_readable() -> None:
    compiled = select(User.__table__.c.id).compile(dialect=create_engine("sqlite://").dialect)
    assert _sqla.orm_entities(compiled.compile_state) is None
    columns = _sqla.compiled_result_columns(compiled)
    assert [c[0] for c in columns] == ["id"], "SQLCompiler._result_columns"
    assert User.__table__.c.id in tuple(columns[0][2])


# -- results and sessions --------------------------------------------------------------------------


def test_a_result_built_from_rows_takes_the_orm_results_flags() -> None:
    def refuse(obj: Any) -> Any:
        raise LookupError

    result: IteratorResult[Any] = IteratorResult(SimpleResultMetaData(["User"]), iter([("a",)]))
    marker = (set(), refuse)
    _sqla.shape_result(result, filtered=True, single_entity=True, unique_filter=marker)
    assert result._attributes["filtered"] is True, "Result._attributes"
    assert result._attributes["is_single_entity"] is True, "Result._attributes"
    assert result._source_supports_scalars is True, "Result._source_supports_scalars"
    assert result._unique_filter_state is marker, "Result._unique_filter_state"
    with pytest.raises(LookupError):
        result.all()


def test_objects_are_built_into_a_session_as_a_load_builds_them() -> None:
    assert _sqla.identity_class(inspect(User)) is User, "Mapper._identity_class"
    assert _sqla.identity_class(inspect(Manager)) is Employee, "Mapper._identity_class"
    assert _sqla.is_mapped_class(User) and not _sqla.is_mapped_class(int), "_sa_class_manager"
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with Session(engine) as s:
        obj = inspect(User).class_manager.new_instance()
        state = instance_state(obj)
        state.key = inspect(User).identity_key_from_primary_key((5,))
        state.dict.update(id=5, name="built")
        state.session_id = s.hash_key
        _sqla.add_to_identity_map(s.identity_map)(state, state.key)
        _sqla.commit_loaded(state, s.identity_map)
        assert s.get(User, 5) is obj, "IdentityMap._add_unpresent"
        assert not state.modified and not s.dirty, "InstanceState._commit_all"
        s.expire(obj, ["name"])
        state.dict["name"] = "again"
        _sqla.commit_attributes(state, state.dict, ["name"])
        assert obj.name == "again" and "name" not in state.unloaded, "InstanceState._commit"
    assert statements == []


# -- engines, connections and the mapping ---------------------------------------------------------


def test_the_none_key_of_a_schema_translate_map_is_stored_under_its_private_name() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    schema_map: dict[Any, Any] = {None: "main"}
    with Session(engine.execution_options(schema_translate_map=schema_map)) as s:
        s.execute(select(User)).all()
    assert schema_map.get(_sqla.SCHEMA_MAP_NONE_KEY) == "main", (
        "SQLAlchemy adds the None key of a schema_translate_map as '_none'"
    )


def test_the_isolation_level_set_on_connect_is_readable() -> None:
    engine = create_engine("sqlite://", isolation_level="SERIALIZABLE")
    assert _sqla.connect_isolation_level(engine.dialect) == "SERIALIZABLE", (
        "DefaultDialect._on_connect_isolation_level"
    )
    assert _sqla.connect_isolation_level(create_engine("sqlite://").dialect) is None


def test_every_mapper_of_every_registry_is_reachable() -> None:
    registries = _sqla.mapper_registries()
    assert Base.registry in registries, "sqlalchemy.orm.mapper._mapper_registries"
    managers = _sqla.registry_class_managers(Base.registry)
    assert inspect(User).class_manager in managers, "registry._managers"
    assert hasattr(inspect(User), "_configure_failed"), "Mapper._configure_failed"
    assert not _sqla.configure_failed(inspect(User))
    assert hasattr(inspect(User), "_with_polymorphic_selectable"), (
        "Mapper._with_polymorphic_selectable"
    )
    assert _sqla.polymorphic_selectable(inspect(User)) is User.__table__
