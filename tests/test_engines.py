"""Engines that come and go (issue 9, item 15): a cache keeps nothing alive for an engine that is
gone, and an engine disposed and used again stays cached.

Applications and test suites create engines dynamically; the cache must not grow with them.
"""

from __future__ import annotations

import gc
import weakref

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from tests.fixtures import CacheFactory, SQLCounter, Stack, create_engine_for
from tests.models import User


async def _seed(engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as s:
        s.add(User(id=1, name="user1"))
        await s.commit()


async def _read_twice(engine: AsyncEngine) -> int:
    """Read user 1 twice through a cached session; the SELECTs the second read sent."""
    counter = SQLCounter()
    event.listen(engine.sync_engine, "before_cursor_execute", counter)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with sessions() as s:
            assert (await s.get(User, 1)) is not None
        counter.reset()
        async with sessions() as s:
            user = await s.get(User, 1)
            assert user is not None and user.name == "user1"
        return counter.selects
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", counter)


async def test_item15_an_engine_bound_then_dropped_is_collected_while_the_cache_lives(
    stack: Stack, engine: AsyncEngine, make_cache: CacheFactory
) -> None:
    """Item 15: engines bound, used (cached reads, a commit), disposed and dropped are garbage
    collected although the cache lives on, and the cache's list of databases does not grow."""
    await _seed(engine)
    cache = await make_cache(bind=False)
    refs: list[weakref.ref[object]] = []
    for i in range(3):
        dynamic = await create_engine_for(stack)
        await cache.bind(dynamic, database_id=f"dynamic{i}")
        assert await _read_twice(dynamic) == 0, "premise: the dynamic engine is cached"
        sessions = async_sessionmaker(dynamic, expire_on_commit=False)
        async with sessions() as s:
            user = await s.get(User, 1)
            assert user is not None
            user.name = "user1"  # a write the tracker sees (no change in the end)
            s.add(User(id=100 + i, name=f"new{i}"))
            await s.commit()
        await dynamic.dispose()
        refs += [weakref.ref(dynamic), weakref.ref(dynamic.sync_engine)]
        del dynamic, sessions, s, user
    gc.collect()
    alive = [ref() for ref in refs if ref() is not None]
    assert not alive, f"engines kept alive by the cache: {alive}"
    assert cache.stats()["databases"] == [], cache.stats()["databases"]


async def test_item15_an_engine_disposed_and_used_again_is_still_cached(
    engine: AsyncEngine, make_cache: CacheFactory
) -> None:
    """Item 15: `dispose()` gives the engine a new pool; the engine stays bound (cached)."""
    await _seed(engine)
    await make_cache()
    assert await _read_twice(engine) == 0
    await engine.dispose()
    assert await _read_twice(engine) == 0, "the disposed engine is no longer cached"
