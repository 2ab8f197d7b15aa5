"""Pins every private SQLAlchemy name sqlacache relies on (sqlacache/_sqla.py).

When a SQLAlchemy release renames or changes one, the test that fails names it, before a user
meets a cache that silently stops caching or serves the wrong thing.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import Session, selectinload

from sqlacache import _sqla
from tests.models import Base, Order, User


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
        assert options["schema_translate_map"] == {None: "tenant_a"}, "Connection._execution_options"


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
