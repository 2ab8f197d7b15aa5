"""Transactions, and the rules for when a read bypasses the cache.

Nothing uncommitted is cached or served to another session; a transaction sees its own writes;
rollbacks (savepoints included) discard only their own part; a hit never overwrites a pending edit.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from tests.models import Order, User


@pytest.fixture
async def users(sessions):
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2, 3)])
        s.add(Order(id=1, user_id=1, total=10))
        await s.commit()


async def name_of(sessions, pk, **kw):
    async with sessions() as s:
        user = await s.get(User, pk, **kw)
        return None if user is None else user.name


async def all_names(sessions, **options):
    async with sessions() as s:
        stmt = select(User).order_by(User.id).execution_options(**options)
        return [u.name for u in (await s.execute(stmt)).scalars()]


# -- C5 ------------------------------------------------------------------------------------------


async def test_a_transaction_reads_its_own_flushed_writes_and_nobody_else_does(
    cache, users, sessions
):
    assert await all_names(sessions) == ["user1", "user2", "user3"]
    assert await name_of(sessions, 1) == "user1"
    async with sessions() as writer:
        (await writer.get(User, 1)).name = "draft"
        await writer.flush()
        # inside the transaction: its own write, never a cached copy
        assert (await writer.get(User, 1)).name == "draft"
        rows = (await writer.execute(select(User).order_by(User.id))).scalars().all()
        assert rows[0].name == "draft"
        # outside: the committed value, and the uncommitted one was not cached
        assert await name_of(sessions, 1) == "user1"
        assert await all_names(sessions) == ["user1", "user2", "user3"]
        await writer.rollback()
    assert await name_of(sessions, 1) == "user1"
    assert await all_names(sessions) == ["user1", "user2", "user3"]


async def test_an_uncommitted_insert_read_by_get_never_reaches_other_sessions(
    cache, users, sessions
):
    async with sessions() as writer:
        writer.add(User(id=50, name="phantom"))
        await writer.flush()
        writer.expunge_all()
        assert (await writer.get(User, 50)).name == "phantom"
        assert (await writer.scalar(select(func.count()).select_from(User))) == 4
        await writer.rollback()
    assert await name_of(sessions, 50) is None
    async with sessions() as s:
        assert await s.scalar(select(func.count()).select_from(User)) == 3


async def test_an_uncommitted_bulk_update_never_reaches_other_sessions(cache, users, sessions):
    async with sessions() as writer:
        await writer.execute(update(User).values(name="dirty"))
        assert {u.name for u in (await writer.execute(select(User))).scalars()} == {"dirty"}
        assert await all_names(sessions) == ["user1", "user2", "user3"]
        await writer.rollback()
    assert await all_names(sessions) == ["user1", "user2", "user3"]


async def test_reads_of_untouched_tables_still_use_the_cache_in_a_writing_transaction(
    stack, cache, users, sessions, sql
):
    if stack.db_url.startswith("sqlite"):
        pytest.skip("a sqlite transaction that wrote reads one snapshot: no cache (see below)")
    async with sessions() as s:
        await s.get(Order, 1)
    async with sessions() as writer:
        (await writer.get(User, 2)).name = "x"
        await writer.flush()
        sql.reset()
        assert (await writer.get(Order, 1)).total == 10
        assert sql.selects == 0
        await writer.rollback()


async def test_savepoint_rollback_discards_only_its_own_writes(cache, users, sessions):
    await name_of(sessions, 1)
    await name_of(sessions, 2)
    await all_names(sessions)
    async with sessions() as s:
        (await s.get(User, 1)).name = "outer"
        await s.flush()
        savepoint = await s.begin_nested()
        (await s.get(User, 2)).name = "inner"
        await s.flush()
        await savepoint.rollback()
        await s.commit()
    assert await name_of(sessions, 1) == "outer"
    assert await name_of(sessions, 2) == "user2"
    assert await all_names(sessions) == ["outer", "user2", "user3"]


async def test_released_savepoint_writes_are_invalidated_at_commit(cache, users, sessions):
    await name_of(sessions, 3)
    async with sessions() as s:
        async with s.begin_nested():
            (await s.get(User, 3)).name = "nested"
        await s.commit()
    assert await name_of(sessions, 3) == "nested"


async def test_rollback_leaves_the_cache_serving_committed_data(cache, users, sessions, sql):
    await name_of(sessions, 1)
    async with sessions() as s:
        (await s.get(User, 1)).name = "never"
        await s.flush()
        await s.rollback()
    assert await name_of(sessions, 1) == "user1"
    sql.reset()
    assert await name_of(sessions, 1) == "user1"
    assert sql.selects == 0  # filled again after the rollback released its lease


@pytest.mark.parametrize("autoflush", [True, False])
async def test_a_hit_never_overwrites_a_pending_edit(cache, users, engine, autoflush):
    stmt = select(User).order_by(User.id)
    async with AsyncSession(engine, autoflush=autoflush) as s:
        await s.execute(stmt)  # fill
    async with AsyncSession(engine, autoflush=autoflush, expire_on_commit=False) as s:
        user = await s.get(User, 1)
        user.name = "pending"
        rows = (await s.execute(stmt)).scalars().all()
        assert rows[0] is user and user.name == "pending"
        if not autoflush:  # with autoflush the query flushed it, as it would uncached
            assert user in s.dirty
        await s.commit()
    async with AsyncSession(engine) as s:
        assert (await s.get(User, 1)).name == "pending"


async def test_a_hit_fills_expired_attributes_of_identity_map_objects(cache, users, engine):
    stmt = select(User).order_by(User.id)
    async with AsyncSession(engine) as s:
        await s.execute(stmt)
    async with AsyncSession(engine) as s:  # expire_on_commit=True
        user = await s.get(User, 2)
        await s.commit()  # expires `user`
        rows = (await s.execute(stmt)).scalars().all()
        assert rows[1] is user
        assert user.name == "user2"  # loaded from the hit; no lazy load (it would need a greenlet)


async def test_text_write_in_a_transaction_stops_cache_use_until_it_ends(
    cache, users, sessions, sql
):
    await name_of(sessions, 1)
    async with sessions() as s:
        await s.execute(text("UPDATE users SET name = 'raw' WHERE id = 1"))
        assert (await s.get(User, 1)).name == "raw"
        await s.rollback()
    sql.reset()
    assert await name_of(sessions, 1) == "user1"
    assert sql.selects == 0


async def test_session_joined_to_an_outer_transaction(cache, users, engine, sessions):
    await name_of(sessions, 1)
    async with engine.connect() as conn:
        trans = await conn.begin()
        await conn.execute(
            update(User.__table__).where(User.__table__.c.id == 1).values(name="outer")
        )
        async with AsyncSession(bind=conn, join_transaction_mode="create_savepoint") as s:
            assert (await s.get(User, 1)).name == "outer"  # not the cached "user1"
            await s.commit()  # releases the session's savepoint, not the outer transaction
        assert await name_of(sessions, 1) == "user1"  # others: the committed value
        await trans.commit()
    assert await name_of(sessions, 1) == "outer"


# -- bypasses -----------------------------------------------------------------------------------


async def test_with_for_update_always_reads_the_database(cache, users, sessions, sql):
    for _ in range(2):
        async with sessions() as s:
            await s.execute(select(User).where(User.id == 1).with_for_update())
            await s.get(User, 2, with_for_update=True)
    assert sql.selects == 4


async def test_populate_existing_always_reads_the_database(cache, users, sessions, sql):
    stmt = select(User).order_by(User.id).execution_options(populate_existing=True)
    for _ in range(2):
        async with sessions() as s:
            await s.execute(stmt)
            await s.get(User, 1, populate_existing=True)
    assert sql.selects == 4


async def test_refresh_and_expired_attributes_read_the_database(cache, users, sessions, sql):
    async with sessions() as s:
        user = await s.get(User, 1)
    sql.reset()
    async with sessions() as s:
        user = await s.get(User, 1)
        await s.execute(
            update(User).where(User.id == 1).values(name="fresh"),
            execution_options={"synchronize_session": False},
        )
        await s.refresh(user)
        assert user.name == "fresh"
        s.expire(user, ["name"])
        assert await user.awaitable_attrs.name == "fresh"
        await s.rollback()
    assert sql.selects == 2  # the get was a hit; the refresh and the expired load were not


async def test_streaming_is_never_cached_and_works(cache, users, sessions, sql):
    stmt = select(User).order_by(User.id)
    for _ in range(2):
        async with sessions() as s:
            result = await s.stream(stmt)
            assert [u.name async for u in result.scalars()] == ["user1", "user2", "user3"]
        async with sessions() as s:
            result = await s.stream(stmt.execution_options(yield_per=2))
            assert len([u async for u in result.scalars()]) == 3
    assert sql.selects == 4


async def test_text_selects_and_volatile_functions_are_not_cached(cache, users, sessions, sql):
    for _ in range(2):
        async with sessions() as s:
            await s.execute(text("SELECT name FROM users"))
            await s.execute(select(User).where(User.created < func.now()))
            await s.execute(select(User).order_by(func.random()))
            await s.execute(select(User.name, func.current_timestamp()))
    assert sql.selects == 8
    assert "volatile_function" in str(cache.stats()["models"])


async def test_repeatable_read_transactions_use_the_cache_only_before_their_first_statement(
    stack, make_cache, users, engine, sql
):
    if stack.db_url.startswith("sqlite"):
        pytest.skip("needs a database with REPEATABLE READ snapshots")
    await make_cache()
    rr_engine = engine.execution_options(isolation_level="REPEATABLE READ")
    async with AsyncSession(rr_engine) as s:
        await s.get(User, 1)
        await s.get(User, 2)  # fill both
    sql.reset()
    async with AsyncSession(rr_engine) as s:
        await s.get(User, 1)  # first statement: may use the cache
        assert sql.selects == 0
        await s.execute(select(User.id).where(User.id == 3))  # the snapshot starts here
        await s.get(User, 2)  # a cached copy could be newer than the snapshot: database
        assert sql.selects == 2


async def test_sqlite_snapshot_transactions_never_fill_the_cache_with_old_data(
    tmp_path, make_cache
):
    """SQLAlchemy's SAVEPOINT recipe for sqlite gives each transaction one snapshot."""
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from tests.models import Base, Role

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/recipe.sqlite")

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")

    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as s:
        s.add_all([User(id=1, name="old"), Role(id=1, name="r")])
        await s.commit()
    cache = await make_cache(bind=False)
    await cache.bind(engine)
    stmt = select(User.name).where(User.id == 1)
    try:
        async with sessions() as reader:
            await reader.get(Role, 1)  # the reader's snapshot starts here
            async with sessions() as writer:
                (await writer.get(User, 1)).name = "new"
                await writer.commit()
            assert (await reader.execute(stmt)).scalar() == "old"  # its snapshot: correct for it
        async with sessions() as fresh:
            assert (await fresh.execute(stmt)).scalar() == "new"  # not the reader's old row
    finally:
        await engine.dispose()
