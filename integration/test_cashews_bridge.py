"""The cashews bridge on Redis + PostgreSQL: tests/test_cashews_bridge.py again, then cashews on its
redis:// backend, cashews on mem:// in two OS processes, and a cashews outage."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

from cashews import Cache

from integration.faultkit import FaultProxy
from tests.models import User
from tests.test_cashews_bridge import *  # noqa: F403
from tests.test_cashews_bridge import cached_endpoints

ROOT = Path(__file__).resolve().parent.parent


async def _drop_cashews_keys(redis_url: str, scope: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"*{scope}*")]
    keys += [k async for k in client.scan_iter(match="_tag:users*")]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


async def test_a_function_cached_on_cashews_redis_stays_fresh(stack, make_cache, sessions):
    app_cache = Cache(name=f"r{uuid.uuid4().hex[:6]}")
    app_cache.setup(stack.redis_url)
    cache = await make_cache(cashews=app_cache)
    user_name, user_count, calls = cached_endpoints(app_cache, sessions)
    try:
        async with sessions() as s:
            s.add(User(id=1, name="a"))
            await s.commit()
        assert await user_name(1) == "a"
        assert await user_name(1) == "a"
        assert calls["user"] == 1
        assert await user_count() == 1
        async with sessions() as s:
            user = await s.get(User, 1)
            user.name = "b"
            s.add(User(id=2, name="c"))
            await s.commit()
        assert await user_name(1) == "b"
        assert await user_count() == 2
        assert cache.stats()["cashews"]["errors"] == 0
    finally:
        await app_cache.close()
        await _drop_cashews_keys(stack.redis_url, "user")


async def test_in_process_cashews_caches_of_two_processes_follow_each_others_commits(
    stack, make_cache, sessions
):
    """The other process's cashews lives in its memory: only sqlacache's pub/sub can reach it."""
    app_cache = Cache(name=f"m{uuid.uuid4().hex[:6]}")
    app_cache.setup("mem://")
    cache = await make_cache(cashews=app_cache)
    async with sessions() as s:
        s.add(User(id=1, name="a"))
        await s.commit()
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "integration" / "cashews_worker.py"),
        stack.db_url,
        stack.backend,
        cache.config.prefix,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert worker.stdin is not None and worker.stdout is not None

    async def ask() -> tuple[str, int]:
        worker.stdin.write(b"get 1\n")
        await worker.stdin.drain()
        name, calls = (await asyncio.wait_for(worker.stdout.readline(), 30)).split()
        return name.decode(), int(calls)

    try:
        assert (await asyncio.wait_for(worker.stdout.readline(), 60)).strip() == b"READY"
        assert await ask() == ("a", 1)
        assert await ask() == ("a", 1)  # from its cashews cache
        for n, name in enumerate(("b", "c", "d"), start=2):
            async with sessions() as s:
                user = await s.get(User, 1)
                user.name = name
                await s.commit()
            committed = time.monotonic()
            while (seen := await ask())[0] != name:
                assert time.monotonic() - committed < 2.0, f"still {seen} after the commit"
                await asyncio.sleep(0.002)
            assert seen == (name, n)
            print(
                f"\ncashews mem:// in another process fresh {1000 * (time.monotonic() - committed):.1f} ms after commit"
            )
    finally:
        worker.stdin.write(b"\n")
        await worker.stdin.drain()
        await asyncio.wait_for(worker.wait(), 30)


async def test_tags_not_deleted_during_a_cashews_outage_are_redelivered(
    stack, make_cache, sessions
):
    """cashews' Redis goes through a proxy that refuses connections: the commit still returns at
    once, the deletion is counted as an error, kept pending, and delivered once Redis answers."""
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    database = stack.redis_url.rsplit("/", 1)[1]
    proxy = await FaultProxy(port).start()
    app_cache = Cache(name=f"o{uuid.uuid4().hex[:6]}")
    app_cache.setup(f"redis://127.0.0.1:{proxy.port}/{database}", socket_timeout=0.1)
    cache = await make_cache(cashews=app_cache)
    user_name, _, _ = cached_endpoints(app_cache, sessions)
    try:
        async with sessions() as s:
            s.add(User(id=1, name="a"))
            await s.commit()
        assert await user_name(1) == "a"
        proxy.cut()
        started = time.monotonic()
        async with sessions() as s:
            user = await s.get(User, 1)
            user.name = "b"
            await s.commit()
        took = time.monotonic() - started
        stats = cache.stats()["cashews"]
        assert stats["errors"] >= 1 and stats["pending"] >= 1
        await proxy.restore()
        deadline = time.monotonic() + 10
        while cache.stats()["cashews"]["pending"]:
            assert time.monotonic() < deadline, cache.stats()["cashews"]
            await asyncio.sleep(0.05)
        assert await user_name(1) == "b"
        print(f"\ncommit during a cashews outage took {took * 1000:.1f} ms")
    finally:
        await app_cache.close()
        await _drop_cashews_keys(stack.redis_url, "user")
