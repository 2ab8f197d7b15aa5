"""tests/test_field_findings.py on Redis + PostgreSQL, and the PostgreSQL-only findings."""

# -- item 16 on PostgreSQL: timestamptz through psycopg 3 (ZoneInfo) and asyncpg (timezone) ------
import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from integration.conftest import PG_URL
from tests.models import User
from tests.test_field_findings import *  # noqa: F403
from tests.test_field_findings import _forget_recent_fills

MOMENTS = [
    datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.timezone.utc),
    datetime.datetime(2026, 10, 25, 0, 30, tzinfo=datetime.timezone.utc),  # Berlin: fold=1
    datetime.datetime(2026, 7, 1, 9, 15, 30, 123456, tzinfo=datetime.timezone.utc),
]


async def _miss_then_hit(cache: Any, sessions: Any, counter: list[str]) -> list[datetime.datetime]:
    async with sessions() as s:
        s.add_all([User(id=i, name=f"u{i}", created=m) for i, m in enumerate(MOMENTS, 1)])
        await s.commit()

    async def read() -> list[datetime.datetime]:
        async with sessions() as s:
            entities = [u.created for u in await s.scalars(select(User).order_by(User.id))]
            single = (await s.get(User, 2)).created
            columns = list(await s.scalars(select(User.created).order_by(User.id)))
            return [*entities, single, *columns]

    first = await read()
    await cache.flush_pending()
    stats = cache.stats()["models"]["tests.models.User"]
    assert stats["fetch"]["stores"] == 2 and stats["get"]["stores"] == 1, stats
    _forget_recent_fills(cache)
    counter.clear()
    second = await read()
    assert counter == []  # every read was a hit
    for miss, hit in zip(first, second, strict=True):
        assert hit == miss
        assert type(hit.tzinfo) is type(miss.tzinfo)
        assert getattr(hit.tzinfo, "key", None) == getattr(miss.tzinfo, "key", None)
        assert (hit.utcoffset(), hit.fold, hit.replace(tzinfo=None)) == (
            miss.utcoffset(),
            miss.fold,
            miss.replace(tzinfo=None),
        )
    return first


@pytest.mark.parametrize(
    ("zone", "tzinfo_type"), [("Europe/Berlin", ZoneInfo), ("UTC", datetime.timezone)]
)
async def test_psycopg3_timestamptz_hits_keep_their_zoneinfo(
    make_cache, engine, zone, tzinfo_type
) -> None:
    """Item 16: psycopg 3 returns timestamptz values with a `zoneinfo.ZoneInfo` tzinfo: they are
    cached, and a hit returns equal values with the same tzinfo class and key."""
    url = PG_URL.replace("postgresql+asyncpg", "postgresql+psycopg")
    psycopg_engine = create_async_engine(url, connect_args={"options": f"-c TimeZone={zone}"})
    counter: list[str] = []
    event.listen(
        psycopg_engine.sync_engine, "before_cursor_execute", lambda *a: counter.append(a[2])
    )
    try:
        cache = await make_cache(bind=False)
        await cache.bind(psycopg_engine)
        sessions = async_sessionmaker(psycopg_engine, expire_on_commit=False)
        first = await _miss_then_hit(cache, sessions, counter)
        assert {type(v.tzinfo) for v in first} == {tzinfo_type}  # what psycopg 3 gives
    finally:
        await psycopg_engine.dispose()


async def test_asyncpg_timestamptz_hits_keep_their_timezone(make_cache, engine, sessions) -> None:
    """Item 16: asyncpg returns `datetime.timezone` tzinfo: a hit returns the same."""
    cache = await make_cache()
    counter: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: counter.append(a[2]))
    first = await _miss_then_hit(cache, sessions, counter)
    assert {type(v.tzinfo) for v in first} == {datetime.timezone}  # what asyncpg gives


# -- item 5 on PostgreSQL: a data-modifying CTE is a write --------------------------------------

from sqlalchemy import update  # noqa: E402

from tests.test_field_findings import _names, _seed_users  # noqa: E402


def _renaming_cte(pk: int, name: str) -> Any:
    cte = update(User).where(User.id == pk).values(name=name).returning(User.id, User.name).cte()
    return select(cte)


async def test_a_data_modifying_cte_is_a_write_of_its_table(cache, sessions, sql) -> None:
    """Item 5: `select(update(...).returning(...).cte())` leases its table at execute, makes it
    stale after commit, and its own session reads its writes, not the cache."""
    await _seed_users(sessions)
    stmt = select(User).order_by(User.id)
    for _ in range(2):
        assert await _names(sessions, stmt) == ["user1", "user2"]
    async with sessions() as writer:
        assert (await writer.execute(_renaming_cte(1, "renamed"))).all() == [(1, "renamed")]
        # the writer sees its own uncommitted write, never the cached entry
        assert [u.name for u in await writer.scalars(stmt)] == ["renamed", "user2"]
        assert (await writer.get(User, 1, populate_existing=True)).name == "renamed"
        # another session reads the committed rows and, under the write lease, fills nothing
        assert await _names(sessions, stmt) == ["user1", "user2"]
        await writer.commit()
    assert await _names(sessions, stmt) == ["renamed", "user2"]
    async with sessions() as s:
        assert (await s.get(User, 1)).name == "renamed"


async def test_a_rolled_back_data_modifying_cte_releases_its_lease(cache, sessions, sql) -> None:
    """Item 5: after a rollback, the table is cacheable again and nothing uncommitted was kept."""
    await _seed_users(sessions)
    stmt = select(User).order_by(User.id)
    assert await _names(sessions, stmt) == ["user1", "user2"]
    async with sessions() as writer:
        await writer.execute(_renaming_cte(2, "never"))
        assert await _names(sessions, stmt) == ["user1", "user2"]
        await writer.rollback()
    await cache.flush_pending()
    assert await _names(sessions, stmt) == ["user1", "user2"]
    await cache.flush_pending()
    sql.reset()
    assert await _names(sessions, stmt) == ["user1", "user2"]
    assert sql.selects == 0  # filled again once the lease was released
