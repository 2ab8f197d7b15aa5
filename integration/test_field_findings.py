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
