"""A result holding objects the session already has is cached from the database's rows.

The Quickstart's own pattern (a `get`, then a list in the same session) and its reverse (a
list, then a lookup of one of its rows) used to run SQL on every request: the session's copy of
an object may be edited, expired or older than the database, so it never entered the cache. The
entry is now filled from a read beside the session, and the caller still gets the session's own
objects, untouched.
"""

from __future__ import annotations

from sqlalchemy import select, update

from tests.models import User


async def seed(sessions) -> None:
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2, 3)])
        await s.commit()


LIST = select(User).order_by(User.id)


async def test_a_get_then_a_list_in_one_session_fills_the_list(cache, sessions, sql):
    await seed(sessions)

    async def request() -> list[str]:
        async with sessions() as s:
            me = await s.get(User, 1)
            users = list(await s.scalars(LIST))
            assert users[0] is me, "the session's own object is returned"
            return [u.name for u in users]

    assert await request() == ["user1", "user2", "user3"]
    await cache.flush_pending()
    sql.reset()
    assert await request() == ["user1", "user2", "user3"]
    assert sql.selects == 0


async def test_a_list_then_a_lookup_of_one_of_its_rows_fills_the_lookup(cache, sessions, sql):
    await seed(sessions)
    lookup = select(User).where(User.name == "user2")

    async def request() -> str:
        async with sessions() as s:
            users = list(await s.scalars(LIST))
            found = (await s.scalars(lookup)).one()
            assert found is users[1]
            return found.name

    assert await request() == "user2"
    await cache.flush_pending()
    sql.reset()
    assert await request() == "user2"
    assert sql.selects == 0


async def test_an_older_copy_in_the_session_is_returned_but_never_cached(
    cache, sessions, engine, sql
):
    """The uncached ORM keeps the session's copy; the entry holds what the database returned."""
    await seed(sessions)
    async with sessions() as s:
        me = await s.get(User, 1)  # loaded now, renamed below by someone else
        async with sessions() as other:
            await other.execute(update(User).where(User.id == 1).values(name="renamed"))
            await other.commit()
        users = list(await s.scalars(LIST))
        assert users[0] is me and me.name == "user1", "as without the cache"
    await cache.flush_pending()
    async with sessions() as s:
        assert [u.name for u in await s.scalars(LIST)] == ["renamed", "user2", "user3"]


async def test_a_pending_edit_is_never_overwritten_nor_cached(cache, sessions, sql):
    await seed(sessions)
    async with sessions() as s:
        s.autoflush = False
        me = await s.get(User, 1)
        me.name = "edited, not flushed"
        users = list(await s.scalars(LIST))
        assert users[0].name == "edited, not flushed"
    async with sessions() as s:
        assert [u.name for u in await s.scalars(LIST)] == ["user1", "user2", "user3"]


async def test_expired_objects_are_refreshed_from_the_entry(cache, sessions, engine, sql):
    from sqlalchemy.ext.asyncio import async_sessionmaker

    await seed(sessions)
    expiring = async_sessionmaker(engine, expire_on_commit=True)
    async with sessions() as s:
        list(await s.scalars(LIST))  # fills the list
    await cache.flush_pending()
    async with expiring() as s:
        me = await s.get(User, 1)
        me.name = "committed"
        await s.commit()  # expires `me`
        sql.reset()
        users = list(await s.scalars(LIST))
        assert users[0] is me and me.name == "committed"
    await cache.flush_pending()
    sql.reset()
    async with sessions() as s:
        assert [u.name for u in await s.scalars(LIST)] == ["committed", "user2", "user3"]
    assert sql.selects == 0
