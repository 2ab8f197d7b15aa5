"""The cashews bridge: functions cached with cashews' own decorator follow ORM writes.

`configure(cashews=app_cache)` deletes the tags `{table}:{pk}` and `{table}` of every committed
write from the application's cashews cache: no manual `delete_tags` anywhere below.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from cashews import Cache
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

import sqlacache
from tests.models import Base, Seat, User


@pytest.fixture
def app_cache() -> Cache:
    cache = Cache(name=f"app{uuid.uuid4().hex[:6]}")
    cache.setup("mem://")
    return cache


def cached_endpoints(app_cache: Cache, sessions: Any) -> tuple[Any, Any, dict[str, int]]:
    calls = {"user": 0, "count": 0}
    scope = uuid.uuid4().hex[:8]  # keys of this test only

    @app_cache(ttl="10m", key=scope + ":user:{user_id}", tags=["users:{user_id}"])
    async def user_name(user_id: int) -> str | None:
        calls["user"] += 1
        async with sessions() as s:
            user = await s.get(User, user_id)
            return None if user is None else user.name

    @app_cache(ttl="10m", key=scope + ":count", tags=["users"])
    async def user_count() -> int:
        calls["count"] += 1
        async with sessions() as s:
            return int((await s.execute(select(func.count()).select_from(User))).scalar_one())

    return user_name, user_count, calls


async def test_a_cashews_cached_function_stays_fresh_through_orm_writes(
    make_cache, sessions, app_cache
):
    cache = await make_cache(cashews=app_cache)
    user_name, user_count, calls = cached_endpoints(app_cache, sessions)
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    assert await user_name(1) == "a"
    assert await user_name(1) == "a"
    assert calls["user"] == 1  # the second call came from cashews
    assert await user_count() == 1
    async with sessions() as s:
        user = await s.get(User, 1)
        user.name = "b"
        await s.commit()
    assert await user_name(1) == "b"
    assert await user_count() == 1
    assert calls["count"] == 2  # `users` is deleted by every write to the table
    async with sessions() as s:
        s.add(User(id=2, name="c"))
        await s.commit()
    assert await user_count() == 2
    async with sessions() as s:
        await s.delete(await s.get(User, 2))
        await s.commit()
    assert await user_count() == 1
    assert await user_name(2) is None
    stats = cache.stats()["cashews"]
    assert stats["tags_deleted"] > 0 and stats["errors"] == 0 and stats["pending"] == 0


async def test_invalidate_evicts_the_cashews_tags_of_the_rows_and_the_table(
    make_cache, sessions, app_cache
):
    cache = await make_cache(cashews=app_cache)
    await app_cache.set("k1", "v", tags=["users:7"])
    await app_cache.set("k2", "v", tags=["users"])
    await app_cache.set("k3", "v", tags=["users:8"])
    await cache.invalidate(User, [7])
    assert await app_cache.get("k1") is None
    assert await app_cache.get("k2") is None
    assert await app_cache.get("k3") == "v"


async def test_composite_keys_are_joined_with_colons_in_key_order(make_cache, sessions, app_cache):
    await make_cache(cashews=app_cache)
    async with sessions() as s:
        s.add(Seat(row="B", number=7, holder="x"))
        await s.commit()
    await app_cache.set("seat", "v", tags=["seats:B:7"])
    await app_cache.set("other", "v", tags=["seats:B:8"])
    async with sessions() as s:
        seat = await s.get(Seat, ("B", 7))
        assert seat is not None
        seat.holder = "y"
        await s.commit()
    assert await app_cache.get("seat") is None
    assert await app_cache.get("other") == "v"


def test_the_bridge_needs_a_cashews_cache() -> None:
    with pytest.raises(sqlacache.ConfigError, match="cashews"):
        sqlacache.configure("mem://", cashews=object())


async def test_a_sync_commit_evicts_too(stack, make_cache, engine, app_cache):
    """A sync Session in a worker thread (FastAPI's def endpoints) while the app's loop runs."""
    url = stack.db_url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")
    sync_engine = create_engine(url)
    cache = await make_cache(cashews=app_cache, bind=False)
    await cache.bind(engine)
    cache.bind_sync(sync_engine)
    try:
        with Session(sync_engine) as s:
            s.add(User(id=1, name="a"))
            s.commit()
        await app_cache.set("u1", "a", tags=["users:1"])

        def write() -> None:
            with Session(sync_engine) as s:
                user = s.get(User, 1)
                assert user is not None
                user.name = "b"
                s.commit()

        await asyncio.to_thread(write)
        assert await app_cache.get("u1") is None
    finally:
        sync_engine.dispose()


def test_a_sync_commit_with_no_event_loop_at_all_evicts(stack, app_cache):
    """A purely synchronous application: the deletion runs on a private loop."""
    url = stack.db_url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")
    sync_engine = create_engine(url)
    Base.metadata.drop_all(sync_engine)
    Base.metadata.create_all(sync_engine)
    cache = sqlacache.configure(
        stack.backend, {"*": {"timeout": 300}}, prefix=f"s{uuid.uuid4().hex[:8]}", cashews=app_cache
    )
    cache.bind_sync(sync_engine)
    try:
        with Session(sync_engine) as s:
            s.add(User(id=1, name="a"))
            s.commit()
        asyncio.run(app_cache.set("u1", "a", tags=["users:1"]))
        with Session(sync_engine) as s:
            user = s.get(User, 1)
            assert user is not None
            user.name = "b"
            s.commit()
        assert asyncio.run(app_cache.get("u1")) is None
        assert cache.stats()["cashews"]["errors"] == 0
    finally:
        cache.invalidate_all_sync()
        cache.disconnect_sync()
        sync_engine.dispose()
