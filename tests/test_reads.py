"""The seed README's promises: reads are cached per the models/ops config, commits make them fresh.

Each test runs on mem:// + SQLite here and on Redis + PostgreSQL from integration/.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import uuid

import pytest
from sqlalchemy import exists, func, select, text

from sqlacache import ConfigError
from tests.catalog import Category, Product
from tests.models import Status, User


async def seed_users(sessions, n=3):
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, n + 1)])
        await s.commit()


async def get_name(sessions, pk, **kw):
    async with sessions() as s:
        user = await s.get(User, pk, **kw)
        return None if user is None else user.name


async def fetch_names(sessions, stmt):
    async with sessions() as s:
        return [u.name for u in (await s.execute(stmt)).scalars()]


async def scalar(sessions, stmt):
    async with sessions() as s:
        return await s.scalar(stmt)


async def test_second_get_in_a_new_session_issues_no_sql(cache, sessions, sql):
    await seed_users(sessions)
    assert await get_name(sessions, 1) == "user1"
    sql.reset()
    assert await get_name(sessions, 1) == "user1"
    assert sql.statements == []


async def test_commit_makes_the_next_get_fresh(cache, sessions, sql):
    await seed_users(sessions)
    await get_name(sessions, 1)
    async with sessions() as s:
        (await s.get(User, 1)).name = "alice"
        await s.commit()
    assert await get_name(sessions, 1) == "alice"
    sql.reset()
    assert await get_name(sessions, 1) == "alice"
    assert sql.selects == 0


async def test_commit_of_another_row_keeps_a_get_cached(cache, sessions, sql):
    await seed_users(sessions)
    await get_name(sessions, 1)
    async with sessions() as s:
        (await s.get(User, 2)).name = "bob"
        await s.commit()
    sql.reset()
    assert await get_name(sessions, 1) == "user1"
    assert sql.selects == 0


async def test_select_list_is_cached_and_fresh_after_commit(cache, sessions, sql):
    await seed_users(sessions)
    stmt = select(User).where(User.active.is_(True)).order_by(User.id)
    assert await fetch_names(sessions, stmt) == ["user1", "user2", "user3"]
    sql.reset()
    assert await fetch_names(sessions, stmt) == ["user1", "user2", "user3"]
    assert sql.selects == 0
    async with sessions() as s:
        (await s.get(User, 2)).name = "bob"
        await s.commit()
    assert await fetch_names(sessions, stmt) == ["user1", "bob", "user3"]


@pytest.mark.parametrize(
    ("op", "stmt", "expected"),
    [
        ("fetch", select(User.name).order_by(User.id), None),
        ("count", select(func.count()).select_from(User), 3),
        ("count", select(func.count(User.id)), 3),
        ("exists", select(exists().where(User.id == 2)), True),
        ("exists", select(select(User).where(User.id == 2).exists()), True),
    ],
)
async def test_each_op_is_cached_only_when_enabled(make_cache, sessions, sql, op, stmt, expected):
    await seed_users(sessions)

    async def run():
        async with sessions() as s:
            result = await s.execute(stmt)
            return result.all() if op == "fetch" else result.scalar()

    await make_cache({"tests.models.User": {"ops": {"get"} if op != "get" else {"fetch"}}})
    first = await run()
    sql.reset()
    assert await run() == first
    assert sql.selects == 1, f"{op} must not be cached when its op is disabled"

    await make_cache({"tests.models.User": {"ops": {op}}})
    await run()
    sql.reset()
    second = await run()
    assert sql.selects == 0, f"{op} must be cached when its op is enabled"
    if expected is not None:
        assert second == expected


async def test_get_is_not_cached_when_only_fetch_is_enabled(make_cache, sessions, sql):
    await seed_users(sessions)
    await make_cache({"tests.models.User": {"ops": {"fetch"}}})
    await get_name(sessions, 1)
    sql.reset()
    await get_name(sessions, 1)
    assert sql.selects == 1


async def test_star_fallback_caches_every_mapped_model(make_cache, sessions, sql):
    async with sessions() as s:
        s.add(Product(id=1, title="lamp"))
        await s.commit()
    await make_cache({"*": {"timeout": 60}})
    async with sessions() as s:
        await s.get(Product, 1)
    sql.reset()
    async with sessions() as s:
        assert (await s.get(Product, 1)).title == "lamp"
    assert sql.selects == 0


async def test_module_pattern_covers_that_module_only(make_cache, sessions, sql):
    await seed_users(sessions)
    async with sessions() as s:
        s.add_all([Product(id=1, title="lamp"), Category(id=1, label="home")])
        await s.commit()
    await make_cache({"tests.catalog.*": {"ops": "all"}})

    async def read():
        async with sessions() as s:
            await s.get(Product, 1)
            await s.get(Category, 1)
            await s.get(User, 1)

    await read()
    sql.reset()
    await read()
    assert sql.selects == 1  # only User (another module) still reads the database


async def test_none_entry_disables_a_model_under_a_star(make_cache, sessions, sql):
    await seed_users(sessions)
    await make_cache({"*": {}, "tests.models.User": None})
    await get_name(sessions, 1)
    sql.reset()
    await get_name(sessions, 1)
    assert sql.selects == 1


async def test_entries_expire_after_their_timeout(make_cache, sessions, sql):
    await seed_users(sessions)
    await make_cache({"tests.models.User": {"timeout": 1}})
    await get_name(sessions, 1)
    sql.reset()
    await get_name(sessions, 1)
    assert sql.selects == 0
    await asyncio.sleep(1.3)  # the passage of time is what is under test here
    await get_name(sessions, 1)
    assert sql.selects == 1


async def test_cache_timeout_option_sets_the_ttl(cache, sessions, sql):
    await seed_users(sessions)
    stmt = select(User).order_by(User.id).execution_options(cache_timeout=1)
    await fetch_names(sessions, stmt)
    await asyncio.sleep(1.3)
    sql.reset()
    await fetch_names(sessions, stmt)
    assert sql.selects == 1


@pytest.mark.parametrize("bad", [0, -5, 1.5, "10", True])
async def test_invalid_cache_timeout_raises_config_error(cache, sessions, bad):
    await seed_users(sessions)
    with pytest.raises(ConfigError, match="cache_timeout"):
        await fetch_names(sessions, select(User).execution_options(cache_timeout=bad))


@pytest.mark.parametrize("option", [{"cache": False}, {"sqlacache_skip_interceptor": True}])
async def test_cache_false_neither_reads_nor_fills(cache, sessions, sql, option):
    await seed_users(sessions)
    stmt = select(User).order_by(User.id)
    await fetch_names(sessions, stmt.execution_options(**option))
    sql.reset()
    await fetch_names(sessions, stmt)
    assert sql.selects == 1  # the skipped read did not fill
    sql.reset()
    await fetch_names(sessions, stmt.execution_options(**option))
    assert sql.selects == 1  # and does not read either


async def test_call_options_win_over_statement_options(cache, sessions, sql):
    await seed_users(sessions)
    stmt = select(User).order_by(User.id).execution_options(cache=False)
    async with sessions() as s:
        await s.execute(stmt, execution_options={"cache": True})
    sql.reset()
    await fetch_names(sessions, select(User).order_by(User.id))
    assert sql.selects == 0


async def test_manual_invalidation_after_raw_sql(cache, sessions, sql):
    await seed_users(sessions)
    await get_name(sessions, 1)
    stmt = select(User).order_by(User.id)
    await fetch_names(sessions, stmt)
    async with sessions() as s:
        await s.execute(text("UPDATE users SET name = 'raw' WHERE id = 1"))
        await s.commit()
    # raw SQL is not parsed: the user says what changed
    await cache.invalidate(User, pks=[1])
    assert await get_name(sessions, 1) == "raw"
    assert (await fetch_names(sessions, stmt))[0] == "raw"


async def test_invalidate_model_without_pks_makes_the_table_stale(cache, sessions):
    await seed_users(sessions)
    await get_name(sessions, 2)
    async with sessions() as s:
        await s.execute(text("UPDATE users SET name = 'raw'"))
        await s.commit()
    await cache.invalidate(User)
    assert await get_name(sessions, 2) == "raw"


async def test_invalidate_by_table_name_and_dotted_path(cache, sessions):
    await seed_users(sessions)
    for target in ("users", "tests.models.User"):
        await get_name(sessions, 3)
        async with sessions() as s:
            await s.execute(text(f"UPDATE users SET name = '{target}' WHERE id = 3"))
            await s.commit()
        await cache.invalidate(target, pks=[3])
        assert await get_name(sessions, 3) == target


async def test_invalidate_with_empty_pks_does_nothing(cache, sessions, sql):
    await seed_users(sessions)
    await get_name(sessions, 1)
    await cache.invalidate(User, pks=[])
    sql.reset()
    await get_name(sessions, 1)
    assert sql.selects == 0


async def test_invalidate_unknown_target_names_it(cache):
    with pytest.raises(ConfigError, match="no_such_table"):
        await cache.invalidate("no_such_table")


async def test_invalidate_all_makes_everything_stale(cache, sessions):
    await seed_users(sessions)
    await get_name(sessions, 1)
    async with sessions() as s:
        await s.execute(text("UPDATE users SET name = 'after'"))
        await s.commit()
    await cache.invalidate_all()
    assert await get_name(sessions, 1) == "after"


async def test_execute_caches_on_demand_what_the_config_does_not(make_cache, sessions, sql):
    await seed_users(sessions)
    cache = await make_cache({"tests.models.User": None})
    stmt = select(User).where(User.id > 1).order_by(User.id)
    async with sessions() as s:
        first = [u.name for u in (await cache.execute(s, stmt, timeout=60)).scalars()]
    sql.reset()
    async with sessions() as s:
        second = [u.name for u in (await cache.execute(s, stmt)).scalars()]
    assert first == second == ["user2", "user3"]
    assert sql.selects == 0
    sql.reset()
    await fetch_names(sessions, stmt)  # a plain execute still honours the None entry
    assert sql.selects == 1


async def test_disconnect_leaves_sessions_working_uncached(cache, sessions, sql):
    await seed_users(sessions)
    await get_name(sessions, 1)
    await cache.disconnect()
    sql.reset()
    assert await get_name(sessions, 1) == "user1"
    assert await get_name(sessions, 1) == "user1"
    assert sql.selects == 2


async def test_values_round_trip_exactly_as_an_uncached_read_returns_them(cache, sessions, sql):
    async with sessions() as s:
        s.add(
            User(
                id=1,
                name="typed",
                score=decimal.Decimal("12.34"),
                created=datetime.datetime(
                    2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc
                ),
                data={"tags": ["a", "b"], "n": 1, "nested": {"x": None}},
                status=Status.BANNED,
                token=uuid.uuid4(),
            )
        )
        await s.commit()
    fields = ("name", "score", "created", "data", "status", "token", "active")

    async def read(**kw):
        async with sessions() as s:
            user = await s.get(User, 1, **kw)
            # type names: asyncpg returns its own UUID subclass, a hit returns uuid.UUID
            return [(getattr(user, f), type(getattr(user, f)).__name__) for f in fields]

    truth = await read(execution_options={"cache": False})
    assert await read() == truth  # miss
    sql.reset()
    assert await read() == truth  # hit
    assert sql.selects == 0
    assert truth[4][0] is Status.BANNED


async def test_a_hit_is_a_clean_persistent_object(cache, sessions):
    await seed_users(sessions)
    await get_name(sessions, 1)
    async with sessions() as s:
        user = await s.get(User, 1)
        assert user in s and not s.dirty and not s.new
        user.name = "edited"
        await s.commit()
    assert await get_name(sessions, 1) == "edited"


async def test_a_hit_returns_identity_map_objects_as_they_are(cache, sessions):
    await seed_users(sessions)
    stmt = select(User).order_by(User.id)
    await fetch_names(sessions, stmt)
    async with sessions() as s:
        mine = await s.get(User, 1, options=[])
        rows = (await s.execute(stmt)).scalars().all()
        assert rows[0] is mine


async def test_scalars_one_and_rows_of_entities_and_columns(cache, sessions):
    await seed_users(sessions)
    stmt = select(User, User.name.label("n")).where(User.id == 2)
    for _ in range(2):
        async with sessions() as s:
            row = (await s.execute(stmt)).one()
            assert row.User.id == 2 and row.n == "user2"
            assert row._mapping["n"] == "user2"


async def test_a_callers_in_place_edit_of_a_json_value_never_reaches_the_cache_or_other_readers(
    cache, sessions, engine, sql
):
    import asyncio

    async with sessions() as s:
        s.add(User(id=1, name="j", data={"tags": ["a"]}))
        await s.commit()

    async def read_and_scribble():
        async with sessions() as s:
            user = await s.get(User, 1)
            seen = {"tags": list(user.data["tags"])}
            user.data["tags"].append("scribbled")  # in place, never flushed
            s.expunge_all()
            return seen

    # concurrent cold readers share one query (and one snapshot) in this process
    results = await asyncio.gather(*(read_and_scribble() for _ in range(5)))
    assert results == [{"tags": ["a"]}] * 5
    await cache.flush_pending()
    sql.reset()
    assert await read_and_scribble() == {"tags": ["a"]}  # a hit: the stored copy is untouched
    assert sql.selects == 0
