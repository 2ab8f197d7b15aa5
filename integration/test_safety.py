"""Payload safety (S1), bounded bookkeeping (S3) and the cross-process fill lock (F5), on real Redis."""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from sqlacache.keys import ROW_VERSION_MARGIN_MS, WRITTEN_ROW_TTL_MS
from tests.models import Order, User

ROOT = Path(__file__).resolve().parent.parent


class Exploit:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
async def redis_client(stack):
    client = aioredis.from_url(stack.redis_url)
    yield client
    await client.aclose()


async def seed(sessions, n=5):
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, n + 1)])
        s.add(Order(id=1, user_id=1, total=3))
        await s.commit()


async def read_everything(engine):
    async with AsyncSession(engine) as s:
        users = [u.name for u in (await s.execute(select(User).order_by(User.id))).scalars()]
        one = (await s.get(User, 1)).name
        count = await s.scalar(select(func.count()).select_from(Order))
    return users, one, count


@pytest.mark.parametrize("serializer", [{}, {"serializer": "pickle", "secret": "s" * 32}])
async def test_a_planted_pickle_under_every_key_executes_nothing(
    make_cache, sessions, engine, redis_client, tmp_path, serializer
):
    await seed(sessions)
    cache = await make_cache(**serializer)
    truth = await read_everything(engine)
    assert await read_everything(engine) == truth
    await cache.flush_pending()  # entries are written in the background
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker))
    keys = [k async for k in redis_client.scan_iter(match=f"{cache.config.prefix}:*")]
    assert keys
    for key in keys:
        kind = await redis_client.type(key)
        if kind == b"string":
            await redis_client.set(key, payload)
    for _ in range(3):
        assert await read_everything(engine) == truth
    assert not marker.exists()
    # a planted value shaped like an entry (stamp line, then a pickle) is refused too
    entries = [k async for k in redis_client.scan_iter(match=f"{cache.config.prefix}:e:*")]
    for key in entries:
        await redis_client.set(key, b"x\n" + payload)
    assert await read_everything(engine) == truth
    assert not marker.exists()


async def test_undecodable_entries_are_misses_evicted_and_counted(make_cache, sessions, engine, redis_client):
    await seed(sessions)
    cache = await make_cache()
    await read_everything(engine)
    async with AsyncSession(engine) as s:
        await s.get(User, 2)
    await cache.flush_pending()  # entries are written in the background
    stamp_and_garbage = {}
    for key in [k async for k in redis_client.scan_iter(match=f"{cache.config.prefix}:e:*")]:
        value = await redis_client.get(key)
        stamp, _, _ = value.partition(b"\n")
        stamp_and_garbage[key] = stamp + b"\nJ0-{not json"  # a valid stamp, a broken payload
        await redis_client.set(key, stamp_and_garbage[key])
    assert await read_everything(engine) == (["user1", "user2", "user3", "user4", "user5"], "user1", 1)
    async with AsyncSession(engine) as s:
        assert (await s.get(User, 2)).name == "user2"
    assert cache.stats()["payload_errors"] == len(stamp_and_garbage)
    for key in stamp_and_garbage:
        assert await redis_client.get(key) != stamp_and_garbage[key]  # evicted (or refilled)


async def test_forged_payloads_are_refused_with_a_secret(make_cache, sessions, engine, redis_client):
    await seed(sessions)
    cache = await make_cache(secret="k" * 32)
    async with AsyncSession(engine) as s:
        await s.get(User, 3)
    await cache.flush_pending()
    (key,) = [k async for k in redis_client.scan_iter(match=f"{cache.config.prefix}:e:*")]
    value = await redis_client.get(key)
    forged = value.replace(b"user3", b"evil3")
    await redis_client.set(key, forged)
    async with AsyncSession(engine) as s:
        assert (await s.get(User, 3)).name == "user3"
    assert cache.stats()["payload_errors"] == 1


async def test_bookkeeping_is_bounded_by_live_entries(make_cache, sessions, engine, redis_client):
    """10 000 cached reads and writes with 1 s TTLs; afterwards nothing but table versions stays."""
    await seed(sessions, 200)
    cache = await make_cache({"*": {"timeout": 1}})
    prefix = cache.config.prefix
    operations = 0
    for round_ in range(50):
        async with AsyncSession(engine) as s:
            for pk in range(1 + round_ % 4, 201, 2):  # 100 gets of distinct rows
                await s.get(User, pk)
                operations += 1
            await s.execute(select(User).where(User.id > round_).limit(5))
            await s.scalar(select(func.count()).select_from(User))
            operations += 2
        async with AsyncSession(engine) as s:
            user = await s.get(User, 1 + round_ % 200, execution_options={"cache": False})
            user.name = f"w{round_}"
            await s.commit()
            operations += 1
    assert operations >= 5000
    await cache.flush_pending()

    async def census():
        counts = {"e": 0, "r": 0, "v": 0, "b": 0, "l": 0, "other": 0}
        ttl_problems = []
        async for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000):
            text = key.decode()
            kind = text.split(":")[1] if text.split(":")[1] == "e" else text.split(":")[2]
            counts[kind if kind in counts else "other"] += 1
            if kind == "e":
                entry_ttl = await redis_client.pttl(key)
                ttl_problems.append(entry_ttl)
        return counts, ttl_problems

    counts, _ = await census()
    # while entries live: row versions only exist for rows read or written recently
    assert counts["r"] <= counts["e"] + 200 + 2 * 50
    # no entry outlives the row versions it depends on
    async for key in redis_client.scan_iter(match=f"{prefix}:*:r:*", count=1000):
        row_ttl = await redis_client.pttl(key)
        assert row_ttl == -2 or row_ttl > 0
    # every TTL has passed (entries 1 s, their row versions +2 s, written rows' versions 5 s):
    # expiry is what is under test here
    await asyncio.sleep(max(1000 + ROW_VERSION_MARGIN_MS, WRITTEN_ROW_TTL_MS) / 1000 + 0.5)
    counts, _ = await census()
    assert counts["e"] == 0 and counts["r"] == 0 and counts["l"] == 0
    assert counts["v"] + counts["b"] <= 2 * 8  # per table, whatever the number of operations
    assert counts["other"] <= 2  # the epoch and the database registry


async def test_entries_never_outlive_the_row_versions_they_depend_on(make_cache, sessions, engine, redis_client):
    await seed(sessions, 3)
    cache = await make_cache({"*": {"timeout": 30}})
    prefix = cache.config.prefix
    async with AsyncSession(engine) as s:
        user = await s.get(User, 1, execution_options={"cache": False})
        user.name = "written"  # creates user 1's row version with the bump TTL
        await s.commit()
    async with AsyncSession(engine) as s:
        await s.get(User, 1, execution_options={"cache_timeout": 600})  # longer than any model's
    await cache.flush_pending()
    (entry,) = [k async for k in redis_client.scan_iter(match=f"{prefix}:e:*")]
    row_keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*:r:*users:1")]
    assert row_keys
    entry_ttl = await redis_client.pttl(entry)
    for key in row_keys:
        assert await redis_client.pttl(key) >= entry_ttl


async def test_lock_makes_four_processes_of_twenty_cold_reads_run_one_query(stack, make_cache, sessions):
    await seed(sessions, 3)
    cache = await make_cache(bind=False)
    prefix = cache.config.prefix
    script = ROOT / "integration" / "lock_reader.py"
    readers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            stack.db_url,
            stack.backend,
            prefix,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(4)
    ]
    for reader in readers:
        assert (await asyncio.wait_for(reader.stdout.readline(), 30)).strip() == b"READY"
    for reader in readers:
        reader.stdin.write(b"go\n")
    await asyncio.gather(*(reader.stdin.drain() for reader in readers))
    queries = 0
    for reader in readers:
        line = (await asyncio.wait_for(reader.stdout.readline(), 60)).split()
        assert line[0] == b"QUERIES", line
        assert line[2] == b"names=user1*20"
        queries += int(line[1])
        assert await reader.wait() == 0
    assert queries == 1
