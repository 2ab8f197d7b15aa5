"""The read path in real applications: the key is built from what will execute, whatever set it.

Field findings pinned here: an option engine's `schema_translate_map` (a tenant per engine), a
`do_orm_execute` listener registered after `bind()` (SQLAlchemy's multi-tenant recipe), lazy
loads of collections, and internal errors that must never reach the application.
"""

from __future__ import annotations

import contextvars

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, registry, with_loader_criteria

from tests.models import Order, Unhashable, User

current_name: contextvars.ContextVar[str] = contextvars.ContextVar("current_name")


async def seed(sessions) -> None:
    async with sessions() as s:
        s.add_all([User(id=1, name="alice"), User(id=2, name="bob")])
        s.add_all([Order(id=1, user_id=1, total=3), Order(id=2, user_id=1, total=4)])
        await s.commit()


async def test_a_listener_registered_after_bind_shapes_the_key(cache, sessions, sql):
    """Issue 9 item 2: the multi-tenant recipe adds criteria in its own listener."""
    await seed(sessions)

    def only_current_name(state):
        if state.is_select and not state.is_column_load and not state.is_relationship_load:
            state.statement = state.statement.options(
                with_loader_criteria(User, User.name == current_name.get())
            )

    event.listen(Session, "do_orm_execute", only_current_name)
    try:

        async def names() -> list[str]:
            async with sessions() as s:
                return [u.name for u in (await s.scalars(select(User).order_by(User.id)))]

        current_name.set("alice")
        assert await names() == ["alice"]
        current_name.set("bob")
        assert await names() == ["bob"]
        sql.reset()
        current_name.set("alice")
        assert await names() == ["alice"]
        current_name.set("bob")
        assert await names() == ["bob"]
        assert sql.selects == 0  # both tenants' lists are cached, each under its own key
    finally:
        event.remove(Session, "do_orm_execute", only_current_name)


async def test_a_listener_after_bind_runs_once_per_execution(cache, sessions):
    """Running the later listeners first must not run them a second time."""
    await seed(sessions)
    calls = []

    def count(state):
        if state.is_select:
            calls.append(state.statement)

    event.listen(Session, "do_orm_execute", count)
    try:
        for _ in range(3):  # a miss, then hits
            calls.clear()
            async with sessions() as s:
                await s.get(User, 1)
            assert len(calls) == 1
    finally:
        event.remove(Session, "do_orm_execute", count)


async def test_one_to_many_lazy_loads_are_cached(cache, sessions, sql):
    """Issue 9 item 17: a lazy load's parameters are named after memory addresses."""
    await seed(sessions)

    async def totals() -> list[int]:
        async with sessions() as s:
            user = await s.get(User, 1)
            return [o.total for o in await user.awaitable_attrs.orders]

    assert await totals() == [3, 4]
    sql.reset()
    assert await totals() == [3, 4]
    assert sql.selects == 0
    async with sessions() as s:
        s.add(Order(id=3, user_id=1, total=5))
        await s.commit()
    assert await totals() == [3, 4, 5]


async def test_tenant_engines_made_with_execution_options_never_share_rows(
    stack, make_cache, engine, sql
):
    """Issue 9 item 1: `engine.execution_options(schema_translate_map=...)` per tenant."""
    if stack.db_url.startswith("sqlite"):
        pytest.skip("SQLite has no schemas to translate to")
    metadata = MetaData()
    accounts = Table(
        "accounts", metadata, Column("id", Integer, primary_key=True), Column("name", String(20))
    )
    async with engine.begin() as conn:
        for tenant in ("tenant_a", "tenant_b"):
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {tenant} CASCADE"))
            await conn.execute(text(f"CREATE SCHEMA {tenant}"))
            tenant_conn = await conn.execution_options(schema_translate_map={None: tenant})
            await tenant_conn.run_sync(metadata.create_all)
            await tenant_conn.execute(accounts.insert().values(id=1, name=tenant))
    mapper_registry = registry()

    class Account:
        pass

    mapper_registry.map_imperatively(Account, accounts)
    try:
        cache = await make_cache({Account: {}})
        makers = {
            tenant: async_sessionmaker(
                engine.execution_options(schema_translate_map={None: tenant})
            )
            for tenant in ("tenant_a", "tenant_b")
        }

        async def read(tenant: str) -> list[str]:
            async with makers[tenant]() as s:
                return [a.name for a in (await s.scalars(select(Account)))]

        assert await read("tenant_a") == ["tenant_a"]
        assert await read("tenant_b") == ["tenant_b"]
        sql.reset()
        assert await read("tenant_a") == ["tenant_a"]
        assert await read("tenant_b") == ["tenant_b"]
        assert sql.selects == 0, cache.stats()
        async with makers["tenant_a"]() as s:
            await s.execute(accounts.update().values(name="renamed"))
            await s.commit()
        assert await read("tenant_a") == ["renamed"]
        assert await read("tenant_b") == ["tenant_b"]
    finally:
        mapper_registry.dispose()
        async with engine.begin() as conn:
            for tenant in ("tenant_a", "tenant_b"):
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {tenant} CASCADE"))


async def test_an_internal_error_falls_back_to_the_database(cache, sessions, sql, monkeypatch):
    """Issue 9 item 11 (F7): an exception inside sqlacache never reaches the caller."""
    await seed(sessions)
    from sqlacache import decision

    def broken(*args, **kwargs):
        raise IndexError("an unforeseen statement shape")

    monkeypatch.setattr(decision, "_entry_digest", broken)
    async with sessions() as s:
        assert (await s.get(User, 1)).name == "alice"
        assert await s.scalar(select(func.count()).select_from(User)) == 2
    assert cache.stats()["internal_errors"] == {"IndexError": 2}


async def test_statements_rendering_the_same_sql_never_share_an_entry(cache, sessions):
    """Field finding: an entity, its columns and a Bundle of them render one SQL text."""
    from sqlalchemy.orm import Bundle, load_only

    await seed(sessions)
    columns = select(User.id, User.name).where(User.id == 1)
    bundle = select(Bundle("b", User.id, User.name)).where(User.id == 1)
    entity = select(User).options(load_only(User.id, User.name)).where(User.id == 1)
    for _ in range(2):  # a miss each, then a hit each
        async with sessions() as s:
            assert (await s.execute(columns)).all() == [(1, "alice")]
            assert (await s.execute(bundle)).all() == [((1, "alice"),)]
            user = (await s.execute(entity)).scalar_one()
            assert isinstance(user, User) and user.name == "alice"


async def test_unique_on_a_hit_dedupes_by_identity_like_the_orm(cache, sessions, sql):
    """Field finding: a model without `__hash__` (SQLModel's) made `.unique()` raise on a hit."""
    await seed(sessions)
    stmt = select(Unhashable).order_by(Unhashable.id)
    async with sessions() as s:
        s.add_all([Unhashable(id=1, label="a"), Unhashable(id=2, label="a")])
        await s.commit()
    for _ in range(2):
        async with sessions() as s:
            rows = (await s.execute(stmt)).unique().scalars().all()
            assert [r.id for r in rows] == [1, 2]
    assert cache.stats()["models"]["tests.models.Unhashable"]["fetch"]["hits"] == 1
