"""The in-process tier (configure(local=True)) against the real Redis and PostgreSQL.

What a user sees: a warm local hit sends nothing to Redis (counted on a private redis-server), a
commit in this process is seen at once, a commit in another OS process reaches this one's tier
within the measured propagation delay, and a pub/sub connection killed or blackholed never lets a
local entry be served more than `local_heartbeat` after the write that made it stale.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import sqlacache
from integration.faultkit import FaultProxy, redis_server
from tests.models import User

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.5


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def fresh(cache: sqlacache.CacheManager) -> bool:
    tier = cache._bound.local_tier
    return tier is not None and tier.mirror.fresh()


async def name_of(sessions: Any, pk: int = 1) -> str:
    async with sessions() as s:
        user = await s.get(User, pk)
        assert user is not None
        return str(user.name)


async def warm(cache: sqlacache.CacheManager, sessions: Any, expected: str) -> None:
    """Fill Redis, then read it back once (a Redis hit keeps the entry in the tier), then once
    more: served locally."""
    tier = cache._bound.local_tier
    assert tier is not None
    assert await name_of(sessions) == expected
    await cache.flush_pending()
    deadline = time.monotonic() + 5.0
    while True:  # the mirror may still wait for this test's own insert to come back
        hits = tier.hits
        assert await name_of(sessions) == expected
        if tier.hits == hits + 1:
            return
        assert time.monotonic() < deadline, tier.stats()
        await asyncio.sleep(0.02)


async def commands(client: Any) -> dict[str, int]:
    """Calls per command on the server, leaving out the tier's heartbeats and this probe."""
    info = await client.info("commandstats")
    counts = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}
    for own in ("publish", "info", "subscribe", "ping", "client|setinfo", "hello", "select"):
        counts.pop(own, None)
    return counts


def test_local_tier_is_refused_on_mem_with_the_reason() -> None:
    with pytest.raises(sqlacache.ConfigError, match="shared backend"):
        sqlacache.configure("mem://", local=True)


async def test_a_warm_local_hit_sends_no_command_to_redis(stack, engine, sessions, sql) -> None:
    import redis.asyncio as aioredis

    with redis_server() as server:
        cache = sqlacache.configure(server.url, {"*": {"timeout": 300}}, local=True)
        await cache.bind(engine)
        try:
            await until(lambda: fresh(cache))
            async with sessions() as s:
                s.add(User(id=1, name="a"))
                await s.commit()
            assert await name_of(sessions) == "a"  # miss: fills Redis
            await cache.flush_pending()
            assert await name_of(sessions) == "a"  # a Redis hit: now kept in the tier
            client = aioredis.from_url(server.url)
            before = await commands(client)
            sql.reset()
            for _ in range(20):
                assert await name_of(sessions) == "a"
            after = await commands(client)
            await client.aclose()
            assert sql.selects == 0
            sent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            assert {k: v for k, v in sent.items() if v} == {}
            assert cache.stats()["local"]["hits"] >= 20
        finally:
            await cache.disconnect()


async def test_a_commit_in_this_process_is_seen_by_its_tier_at_once(
    stack, make_cache, sessions, sql
) -> None:
    cache = await make_cache(local=True)
    await until(lambda: fresh(cache))
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    for expected in ("b", "c", "d"):
        assert await name_of(sessions) != expected
        assert await name_of(sessions) != expected  # served by the tier now
        async with sessions() as s:
            user = await s.get(User, 1)
            assert user is not None
            user.name = expected
            await s.commit()
        assert await name_of(sessions) == expected  # no wait: the tier knew before commit returned
    assert cache.stats()["local"]["hits"] > 0


async def test_model_opted_out_of_the_tier_always_asks_redis(stack, make_cache, sessions) -> None:
    cache = await make_cache({"*": {"timeout": 300, "local": False}}, local=True)
    await until(lambda: fresh(cache))
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    for _ in range(5):
        assert await name_of(sessions) == "a"
    assert cache.stats()["local"]["hits"] == 0


async def test_a_commit_through_another_cache_reaches_the_tier_over_pubsub(
    stack, make_cache, engine, sessions
) -> None:
    """The writer is another cache on its own engine: this cache's invalidator never sees the
    write, only the writer's bump published on the channel can tell the tier."""
    reader = await make_cache(local=True)
    await until(lambda: fresh(reader))
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    await warm(reader, sessions, "a")
    writer_engine = create_async_engine(stack.db_url)
    writer = sqlacache.configure(
        stack.backend, {"*": {"timeout": 300}}, prefix=reader.config.prefix
    )
    await writer.bind(writer_engine)
    try:
        async with AsyncSession(writer_engine) as s:
            user = await s.get(User, 1)
            assert user is not None
            user.name = "b"
            await s.commit()
        await until(lambda: _stale_in_mirror(reader), 2.0)
        assert await name_of(sessions) == "b"
    finally:
        await writer.disconnect()
        await writer_engine.dispose()


def _stale_in_mirror(cache: sqlacache.CacheManager) -> bool:
    """No local entry validates any more (the mirror learned the writer's new tokens)."""
    tier = cache._bound.local_tier
    assert tier is not None
    return not any(tier.mirror.matches(e.keys, e.tokens) for e in list(tier._entries.values()))


async def test_a_killed_subscription_drops_the_mirror_and_comes_back(
    stack, make_cache, sessions
) -> None:
    import redis.asyncio as aioredis

    cache = await make_cache(local=True)
    await until(lambda: fresh(cache))
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    await warm(cache, sessions, "a")
    drops = cache.stats()["local"]["drops"]
    subscriptions = cache.stats()["local"]["subscriptions"]
    client = aioredis.from_url(stack.redis_url)
    await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await client.aclose()
    await until(lambda: cache.stats()["local"]["drops"] > drops, 5.0)
    await until(lambda: cache.stats()["local"]["subscriptions"] > subscriptions, 5.0)
    await until(lambda: fresh(cache))
    assert cache.stats()["local"]["mirror_keys"] >= 0
    assert await name_of(sessions) == "a"


async def test_a_blackholed_subscription_never_serves_past_the_heartbeat(
    stack, engine, sessions
) -> None:
    """This cache's Redis connections, its subscription included, go through a proxy that goes
    silent; another cache on its own engine and a direct connection commits. No read that starts
    more than local_heartbeat after that commit returned shows the old value."""
    import redis.asyncio as aioredis

    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    database = stack.redis_url.rsplit("/", 1)[1]
    proxy = await FaultProxy(port).start()
    prefix = f"bh{os.urandom(4).hex()}"
    reader = sqlacache.configure(
        f"redis://127.0.0.1:{proxy.port}/{database}",
        {"*": {"timeout": 300}},
        prefix=prefix,
        local=True,
        local_heartbeat=HEARTBEAT,
    )
    await reader.bind(engine)
    writer_engine = create_async_engine(stack.db_url)
    writer = sqlacache.configure(stack.redis_url, {"*": {"timeout": 300}}, prefix=prefix)
    await writer.bind(writer_engine)
    try:
        await until(lambda: fresh(reader))
        async with sessions() as s:
            s.add(User(id=1, name="0"))
            await s.commit()
        await warm(reader, sessions, "0")
        proxy.blackhole()
        async with AsyncSession(writer_engine) as s:
            user = await s.get(User, 1)
            assert user is not None
            user.name = "1"
            await s.commit()
        committed = time.monotonic()
        late: list[float] = []
        served_stale = 0
        while time.monotonic() < committed + HEARTBEAT * 3:
            started = time.monotonic()
            name = await name_of(sessions)
            if name == "0":
                served_stale += 1
                if started > committed + HEARTBEAT:
                    late.append(started - committed)
            await asyncio.sleep(0.005)
        assert late == []
        assert not fresh(reader)
        print(f"\nblackholed pub/sub: {served_stale} stale local reads, all within the heartbeat")
        await proxy.restore()
        await until(lambda: fresh(reader), 10.0)
        assert await name_of(sessions) == "1"
    finally:
        await reader.disconnect()
        await writer.disconnect()
        await writer_engine.dispose()
        client = aioredis.from_url(stack.redis_url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "integration" / "local_tier_worker.py"),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        limit=1 << 26,  # a reader's report is one long JSON line
    )


async def test_commits_of_a_writer_process_reach_reader_processes_tiers(
    stack, make_cache, sessions
) -> None:
    """Real OS processes: a writer commits in a loop, two readers with the tier read the row.

    Every read is checked against the commit log: no read that started more than
    `local_heartbeat` after a commit returned shows an older value. The propagation delay (how
    long after a commit returned stale reads were still served) is printed as p50/p99.
    """
    cache = await make_cache()  # a prefix, and cleanup of its keys
    prefix = cache.config.prefix
    async with sessions() as s:
        s.add(User(id=1, name="0"))
        await s.commit()
    commits, interval = 150, "0.02"
    readers = [
        await _spawn("reader", stack.db_url, stack.backend, prefix, "60", str(HEARTBEAT))
        for _ in range(2)
    ]
    writer = await _spawn("writer", stack.db_url, stack.backend, prefix, str(commits), interval)
    procs = [*readers, writer]
    for proc in procs:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"READY"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    returned: dict[int, float] = {}
    token_of: dict[int, str] = {}
    assert writer.stdout is not None
    for _ in range(commits):
        parts = (await asyncio.wait_for(writer.stdout.readline(), 60)).split()
        returned[int(parts[1])] = float(parts[2])
        token_of[int(parts[1])] = parts[3].decode()
    assert await asyncio.wait_for(writer.wait(), 60) == 0
    await asyncio.sleep(0.1)
    for proc in readers:
        assert proc.stdin is not None
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
    results = []
    for proc in readers:
        assert proc.stdout is not None
        results.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    violations, local = [], 0
    propagation: list[float] = []
    for result in results:
        reads = result["reads"]
        local += sum(1 for r in reads if r[3])
        for n, at in returned.items():
            violations += [r for r in reads if r[0] > at + HEARTBEAT and r[2] < n]
        applied = result["applied"]
        missing = [n for n in returned if token_of[n] not in applied]
        if result["local"]["drops"] == 0:  # (a saturated machine may delay a heartbeat)
            assert missing == []  # every commit's bump reached every reader
        propagation += [
            applied[token_of[n]] - at for n, at in returned.items() if token_of[n] in applied
        ]
    total = sum(len(r["reads"]) for r in results)
    if propagation:
        propagation.sort()
        p50 = statistics.median(propagation) * 1000
        p99 = propagation[int(len(propagation) * 0.99) - 1] * 1000
        print(
            f"\nlocal tier propagation (commit() returned in the writer -> the reader's mirror "
            f"has the new token), {len(propagation)} samples: p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms, max {propagation[-1] * 1000:.2f} ms "
            f"(negative: before commit() returned); {total} reads, {local} served locally"
        )
    assert violations == []
    assert local > 0


async def test_a_forked_child_serves_nothing_local_until_its_own_subscriber_runs(
    stack, make_cache, sessions
) -> None:
    """What os.fork's hook does in the child of a pre-forking server that bound before forking:
    the parent's mirror is dropped, and the next Redis read starts the child's own subscriber."""
    cache = await make_cache(local=True)
    await until(lambda: fresh(cache))
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    await warm(cache, sessions, "a")
    tier = cache._bound.local_tier
    assert tier is not None
    tier.subscriber.stop()  # the child has no thread: simulate it, then the hook
    tier.after_fork()
    assert not fresh(cache)
    hits = tier.hits
    assert await name_of(sessions) == "a"  # from Redis; restarts the subscriber
    assert tier.hits == hits
    await until(lambda: fresh(cache))
    await warm(cache, sessions, "a")


async def test_a_sync_session_reads_its_own_commits_through_the_tier(stack, make_cache) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    sync_engine = create_engine(stack.db_url.replace("+asyncpg", "+psycopg"))
    cache = await make_cache(local=True, bind=False)
    cache.bind_sync(sync_engine)
    try:
        await until(lambda: fresh(cache))
        with Session(sync_engine) as s:
            s.add(User(id=1, name="a"))
            s.commit()

        def read() -> str:
            with Session(sync_engine) as s:
                user = s.get(User, 1)
                assert user is not None
                return user.name

        tier = cache._bound.local_tier
        assert tier is not None
        deadline = time.monotonic() + 5.0
        while True:  # fill, Redis hit, then local (once the insert's own message came back)
            hits = tier.hits
            assert read() == "a"
            if tier.hits == hits + 1:
                break
            assert time.monotonic() < deadline, tier.stats()
            await asyncio.sleep(0.02)
        with Session(sync_engine) as s:
            user = s.get(User, 1)
            assert user is not None
            user.name = "b"
            s.commit()
        assert read() == "b"
    finally:
        sync_engine.dispose()
