"""Every commit evicts exactly what it made stale: rows entering or leaving a result, every table
a read touches, cascades.

Each test caches a read, writes, and compares the next read with the database's truth.
"""

from __future__ import annotations

import pytest
from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.orm import joinedload, selectinload

from tests.models import Employee, Item, Manager, Order, Role, Seat, User, user_roles


@pytest.fixture
async def shop(sessions):
    """Users 1-3; user 1 has orders 1-2 (order 1 has an item); roles admin/editor."""
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2, 3)])
        s.add_all([Role(id=1, name="admin"), Role(id=2, name="editor")])
        await s.flush()
        s.add_all([Order(id=1, user_id=1, total=10), Order(id=2, user_id=1, total=20)])
        await s.flush()
        s.add(Item(id=1, order_id=1, sku="a"))
        await s.execute(insert(user_roles).values(user_id=1, role_id=1))
        await s.commit()


async def read(sessions, stmt, shape=lambda r: r.scalars().all(), unique=False):
    async with sessions() as s:
        result = await s.execute(stmt)
        if unique:
            result = result.unique()
        return shape(result)


async def truth(sessions, stmt, shape=lambda r: r.scalars().all(), unique=False):
    return await read(sessions, stmt.execution_options(cache=False), shape, unique)


async def assert_fresh(sessions, stmt, shape, unique=False):
    cached = await read(sessions, stmt, shape, unique)
    assert cached == await truth(sessions, stmt, shape, unique)
    return cached


def names(result):
    return [u.name for u in result.scalars()]


# -- C2: rows entering a result ------------------------------------------------------------------


async def test_update_that_makes_a_row_match_the_where_enters_the_cached_list(
    cache, shop, sessions
):
    stmt = select(User).where(User.active.is_(False)).order_by(User.id)
    assert await read(sessions, stmt, names) == []
    async with sessions() as s:
        (await s.get(User, 2)).active = False
        await s.commit()
    assert await assert_fresh(sessions, stmt, names) == ["user2"]


async def test_get_that_returned_none_sees_a_later_insert(cache, shop, sessions, sql):
    async with sessions() as s:
        assert await s.get(User, 42) is None
    sql.reset()
    async with sessions() as s:
        assert await s.get(User, 42) is None
    assert sql.selects == 0
    async with sessions() as s:
        s.add(User(id=42, name="late"))
        await s.commit()
    async with sessions() as s:
        assert (await s.get(User, 42)).name == "late"


async def test_orm_insert_enters_lists_counts_and_exists(cache, shop, sessions):
    listing = select(User).order_by(User.id)
    counting = select(func.count()).select_from(User)
    existing = select(exists().where(User.name == "newbie"))
    await read(sessions, listing, names)
    assert await read(sessions, counting, lambda r: r.scalar()) == 3
    assert await read(sessions, existing, lambda r: r.scalar()) is False
    async with sessions() as s:
        s.add(User(id=4, name="newbie"))
        await s.commit()
    assert await assert_fresh(sessions, listing, names) == ["user1", "user2", "user3", "newbie"]
    assert await read(sessions, counting, lambda r: r.scalar()) == 4
    assert await read(sessions, existing, lambda r: r.scalar()) is True


async def test_orm_bulk_insert_statement_enters_the_cached_list(cache, shop, sessions):
    listing = select(User).order_by(User.id)
    await read(sessions, listing, names)
    async with sessions() as s:
        await s.execute(insert(User), [{"id": 7, "name": "bulk7"}, {"id": 8, "name": "bulk8"}])
        await s.commit()
    assert (await assert_fresh(sessions, listing, names))[-2:] == ["bulk7", "bulk8"]


async def test_delete_leaves_lists_and_gets(cache, shop, sessions):
    listing = select(User).order_by(User.id)
    await read(sessions, listing, names)
    async with sessions() as s:
        await s.get(User, 3)
    async with sessions() as s:
        await s.delete(await s.get(User, 3))
        await s.commit()
    assert await assert_fresh(sessions, listing, names) == ["user1", "user2"]
    async with sessions() as s:
        assert await s.get(User, 3) is None


async def test_order_moving_to_another_user_enters_that_users_filtered_list(cache, shop, sessions):
    stmt = select(Order).where(Order.user_id == 2).order_by(Order.id)
    ids = lambda r: [o.id for o in r.scalars()]  # noqa: E731
    assert await read(sessions, stmt, ids) == []
    async with sessions() as s:
        (await s.get(Order, 2)).user_id = 2
        await s.commit()
    assert await assert_fresh(sessions, stmt, ids) == [2]


async def test_bulk_update_and_delete_through_a_session(cache, shop, sessions):
    listing = select(User).order_by(User.id)
    await read(sessions, listing, names)
    async with sessions() as s:
        await s.get(User, 1)
    async with sessions() as s:
        await s.execute(update(User).where(User.id < 3).values(name="renamed"))
        await s.commit()
    assert await assert_fresh(sessions, listing, names) == ["renamed", "renamed", "user3"]
    async with sessions() as s:
        assert (await s.get(User, 1)).name == "renamed"
    async with sessions() as s:
        await s.execute(delete(Role).where(Role.id == 2))
        await s.commit()
    assert await assert_fresh(
        sessions, select(Role).order_by(Role.id), lambda r: [x.name for x in r.scalars()]
    ) == ["admin"]


async def test_core_dml_on_the_engine_invalidates(cache, shop, sessions, engine):
    listing = select(User).order_by(User.id)
    await read(sessions, listing, names)
    async with sessions() as s:
        await s.get(User, 2)
    async with engine.begin() as conn:
        await conn.execute(
            update(User.__table__).where(User.__table__.c.id == 2).values(name="core")
        )
    assert (await assert_fresh(sessions, listing, names))[1] == "core"
    async with sessions() as s:
        assert (await s.get(User, 2)).name == "core"


async def test_core_dml_committed_on_an_open_connection_is_fresh_before_checkin(
    cache, shop, sessions, engine
):
    async with sessions() as s:
        await s.get(User, 2)
    async with engine.connect() as conn:
        await conn.execute(
            update(User.__table__).where(User.__table__.c.id == 2).values(name="early")
        )
        await conn.commit()
        # the connection is not checked in yet: its lease keeps the old entry from being served
        async with sessions() as s:
            assert (await s.get(User, 2)).name == "early"
    async with sessions() as s:
        assert (await s.get(User, 2)).name == "early"


# -- C3: every table read counts -----------------------------------------------------------------


async def test_join_filtered_on_a_second_table_follows_that_table(cache, shop, sessions):
    stmt = select(Order).join(Order.user).where(User.name == "user1").order_by(Order.id)
    ids = lambda r: [o.id for o in r.scalars()]  # noqa: E731
    assert await read(sessions, stmt, ids) == [1, 2]
    async with sessions() as s:
        (await s.get(User, 1)).name = "someone else"
        await s.commit()
    assert await assert_fresh(sessions, stmt, ids) == []


async def test_join_on_a_model_that_is_not_cached_still_invalidates(make_cache, shop, sessions):
    await make_cache({"tests.models.Order": {"ops": "all"}})  # User is not cached at all
    stmt = select(Order).join(Order.user).where(User.name == "user1").order_by(Order.id)
    ids = lambda r: [o.id for o in r.scalars()]  # noqa: E731
    assert await read(sessions, stmt, ids) == [1, 2]
    async with sessions() as s:
        await s.execute(update(User).where(User.id == 1).values(name="renamed"))
        await s.commit()
    assert await assert_fresh(sessions, stmt, ids) == []


def users_with_orders(result):
    return [(u.name, [(o.id, o.total) for o in u.orders]) for u in result.scalars()]


@pytest.mark.parametrize("loader", [selectinload, joinedload])
async def test_eager_loaded_children_follow_inserts_and_updates(cache, shop, sessions, loader):
    stmt = select(User).options(loader(User.orders)).order_by(User.id)
    unique = loader is joinedload
    await read(sessions, stmt, users_with_orders, unique)
    async with sessions() as s:
        s.add(Order(id=3, user_id=2, total=30))
        await s.commit()
    assert (await assert_fresh(sessions, stmt, users_with_orders, unique))[1] == (
        "user2",
        [(3, 30)],
    )
    async with sessions() as s:
        (await s.get(Order, 1)).total = 11
        await s.commit()
    assert (await assert_fresh(sessions, stmt, users_with_orders, unique))[0] == (
        "user1",
        [(1, 11), (2, 20)],
    )


def users_with_roles(result):
    return [(u.name, [r.name for r in u.roles]) for u in result.scalars()]


@pytest.mark.parametrize("loader", [selectinload, joinedload])
async def test_many_to_many_eager_loads_follow_the_association_table(cache, shop, sessions, loader):
    stmt = select(User).options(loader(User.roles)).order_by(User.id)
    unique = loader is joinedload
    assert (await read(sessions, stmt, users_with_roles, unique))[0] == ("user1", ["admin"])
    async with sessions() as s:
        user = await s.get(User, 1, options=[selectinload(User.roles)])
        user.roles.append(await s.get(Role, 2))
        await s.commit()
    assert (await assert_fresh(sessions, stmt, users_with_roles, unique))[0] == (
        "user1",
        ["admin", "editor"],
    )
    async with sessions() as s:
        (await s.get(Role, 2)).name = "writer"
        await s.commit()
    assert (await assert_fresh(sessions, stmt, users_with_roles, unique))[0] == (
        "user1",
        ["admin", "writer"],
    )
    async with sessions() as s:
        user = await s.get(User, 1, options=[selectinload(User.roles)])
        user.roles.clear()
        await s.commit()
    assert (await assert_fresh(sessions, stmt, users_with_roles, unique))[0] == ("user1", [])


async def test_mapper_level_selectin_relationship_follows_its_table(cache, shop, sessions):
    stmt = select(Order).order_by(Order.id)
    shape = lambda r: [(o.id, [i.sku for i in o.items]) for o in r.scalars()]  # noqa: E731
    assert await read(sessions, stmt, shape) == [(1, ["a"]), (2, [])]
    async with sessions() as s:
        s.add(Item(id=2, order_id=2, sku="b"))
        await s.commit()
    assert await assert_fresh(sessions, stmt, shape) == [(1, ["a"]), (2, ["b"])]


async def test_lazy_load_of_a_cached_object_follows_child_inserts(cache, shop, sessions):
    async def orders_of_user1():
        async with sessions() as s:
            user = await s.get(User, 1)
            return [o.id for o in await user.awaitable_attrs.orders]

    assert await orders_of_user1() == [1, 2]
    async with sessions() as s:
        s.add(Order(id=5, user_id=1, total=1))
        await s.commit()
    assert await orders_of_user1() == [1, 2, 5]


async def test_column_only_select_follows_updates(cache, shop, sessions):
    stmt = select(User.id, User.name).order_by(User.id)
    rows = lambda r: [tuple(x) for x in r.all()]  # noqa: E731
    await read(sessions, stmt, rows)
    async with sessions() as s:
        (await s.get(User, 3)).name = "c"
        await s.commit()
    assert (await assert_fresh(sessions, stmt, rows))[2] == (3, "c")


async def test_exists_subquery_on_another_table_in_the_where(cache, shop, sessions):
    stmt = select(User).where(exists().where(Order.user_id == User.id)).order_by(User.id)
    assert await read(sessions, stmt, names) == ["user1"]
    async with sessions() as s:
        s.add(Order(id=9, user_id=3))
        await s.commit()
    assert await assert_fresh(sessions, stmt, names) == ["user1", "user3"]


async def test_scalar_subquery_in_the_select_list(cache, shop, sessions):
    count_orders = select(func.count(Order.id)).where(Order.user_id == User.id).scalar_subquery()
    stmt = select(User.name, count_orders.label("n")).order_by(User.id)
    rows = lambda r: [tuple(x) for x in r.all()]  # noqa: E731
    assert (await read(sessions, stmt, rows))[1] == ("user2", 0)
    async with sessions() as s:
        s.add(Order(id=6, user_id=2))
        await s.commit()
    assert (await assert_fresh(sessions, stmt, rows))[1] == ("user2", 1)


async def test_on_delete_cascade_in_the_database_invalidates_children(cache, shop, sessions):
    orders = select(Order).order_by(Order.id)
    items = select(func.count()).select_from(Item)
    await read(sessions, orders)
    assert await read(sessions, items, lambda r: r.scalar()) == 1
    async with sessions() as s:
        await s.execute(delete(User).where(User.id == 1))  # orders and their items cascade
        await s.commit()
    assert await read(sessions, orders) == []
    assert await read(sessions, items, lambda r: r.scalar()) == 0


async def test_inheritance_subclass_update_reaches_base_queries_and_gets(cache, sessions):
    async with sessions() as s:
        s.add_all([Manager(id=1, name="m", budget=5), Employee(id=2, name="e")])
        await s.commit()
    listing = select(Employee).order_by(Employee.id)
    shape = lambda r: [(type(e).__name__, e.name) for e in r.scalars()]  # noqa: E731
    assert await read(sessions, listing, shape) == [("Manager", "m"), ("Employee", "e")]
    async with sessions() as s:
        assert (await s.get(Manager, 1)).budget == 5
    async with sessions() as s:
        manager = await s.get(Manager, 1)
        manager.budget = 6
        manager.name = "boss"
        await s.commit()
    assert await assert_fresh(sessions, listing, shape) == [("Manager", "boss"), ("Employee", "e")]
    async with sessions() as s:
        assert (await s.get(Manager, 1)).budget == 6
    async with sessions() as s:
        assert (await s.get(Employee, 1)).name == "boss"


async def test_composite_primary_keys(cache, sessions, sql):
    async with sessions() as s:
        s.add_all([Seat(row="A", number=1), Seat(row="A", number=2)])
        await s.commit()
    async with sessions() as s:
        assert (await s.get(Seat, ("A", 1))).holder is None
    sql.reset()
    async with sessions() as s:
        await s.get(Seat, ("A", 1))
    assert sql.selects == 0
    async with sessions() as s:
        (await s.get(Seat, ("A", 1))).holder = "ann"
        await s.commit()
    async with sessions() as s:
        assert (await s.get(Seat, ("A", 1))).holder == "ann"
    await cache.invalidate(Seat, pks=[("A", 2)])


# -- C4: granularity -----------------------------------------------------------------------------


async def test_a_row_write_keeps_other_rows_gets_but_evicts_lists(cache, shop, sessions, sql):
    listing = select(User).order_by(User.id)
    await read(sessions, listing, names)
    async with sessions() as s:
        await s.get(User, 2)
    async with sessions() as s:
        (await s.get(User, 1)).name = "one"
        await s.commit()
    sql.reset()
    async with sessions() as s:
        await s.get(User, 2)
    assert sql.selects == 0  # another row's get stays cached
    assert (await read(sessions, listing, names))[0] == "one"
    assert sql.selects == 1  # the list re-read


async def test_table_wide_events_evict_every_get(cache, shop, sessions):
    async with sessions() as s:
        await s.get(User, 2)
    async with sessions() as s:
        await s.execute(update(User).values(active=False))
        await s.commit()
    async with sessions() as s:
        assert (await s.get(User, 2)).active is False
