"""Stampedes (one query for many identical cold reads) and size limits."""

from __future__ import annotations

import asyncio

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.models import User


async def seed(sessions, n=3):
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, n + 1)])
        await s.commit()


async def test_100_concurrent_cold_reads_of_one_key_run_one_query(cache, sessions, sql, engine):
    await seed(sessions)
    sql.reset()

    async def read():
        async with AsyncSession(engine) as s:
            return (await s.get(User, 1)).name

    assert await asyncio.gather(*(read() for _ in range(100))) == ["user1"] * 100
    assert sql.selects == 1, (cache.stats()["circuit_breaker"], cache.stats()["transport_errors"])


async def test_concurrent_cold_lists_run_one_query(cache, sessions, sql, engine):
    await seed(sessions)
    sql.reset()

    async def read():
        async with AsyncSession(engine) as s:
            return [u.name for u in (await s.execute(select(User).order_by(User.id))).scalars()]

    results = await asyncio.gather(*(read() for _ in range(30)))
    assert all(r == ["user1", "user2", "user3"] for r in results)
    assert sql.selects == 1, (cache.stats()["circuit_breaker"], cache.stats()["transport_errors"])


async def test_results_over_max_rows_are_not_cached(make_cache, sessions, sql):
    await seed(sessions, 3)
    await make_cache(max_rows=2)
    small = select(User).where(User.id <= 2).order_by(User.id)
    large = select(User).order_by(User.id)
    for _ in range(2):
        async with sessions() as s:
            assert len((await s.execute(small)).scalars().all()) == 2
            assert len((await s.execute(large)).scalars().all()) == 3
    assert sql.selects == 1 + 2  # small: one miss; large: never cached


async def test_results_over_max_bytes_are_not_cached(make_cache, sessions, sql):
    async with sessions() as s:
        s.add(User(id=1, name="x", data={"blob": "y" * 5000}))
        s.add(User(id=2, name="z"))
        await s.commit()
    cache = await make_cache(max_bytes=2000)
    for _ in range(2):
        async with sessions() as s:
            await s.get(User, 1)
            await s.get(User, 2)
    assert sql.selects == 2 + 1
    assert cache.stats()["models"]["tests.models.User"]["get"]["bypasses"]["too_large"] == 2
