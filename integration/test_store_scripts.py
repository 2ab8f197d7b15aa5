"""The store's Lua scripts on the real Redis, beyond the rules every store shares
(tests/test_store_rules.py): a server that lost its scripts still answers, and the sync client
runs the same script.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sqlacache.backends.base import Bump
from sqlacache.backends.redis import RedisStore
from sqlacache.config import parse_backend
from tests.fixtures import Stack
from tests.test_store_rules import PREFIX, fill, k


@pytest.fixture
async def redis_pair(stack: Stack) -> AsyncIterator[tuple[RedisStore, aioredis.Redis]]:
    assert stack.redis_url is not None
    store = RedisStore(parse_backend(stack.redis_url), operation_timeout=2.0)
    raw = aioredis.from_url(stack.redis_url)
    await _clear(raw)
    try:
        yield store, raw
    finally:
        await _clear(raw)
        await raw.aclose()
        await store.aclose()


async def _clear(raw: aioredis.Redis) -> None:
    keys = [key async for key in raw.scan_iter(f"{PREFIX}:*")]
    if keys:
        await raw.delete(*keys)


async def test_scripts_survive_a_server_that_lost_them(
    redis_pair: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, raw = redis_pair
    await store.store_async(fill(entry_key=k("before")))
    await raw.script_flush()  # as after a Redis restart
    await store.store_async(fill(entry_key=k("after")))
    assert await raw.get(k("after")) == b"payload"
    await raw.script_flush()
    bump = Bump(persistent=[k("table")], expiring=[], acquire=[], release=[])
    await store.bump_async(bump, b"t9", 5_000, 5_000)
    assert await raw.get(k("table")) == b"t9"


def test_sync_store_runs_the_same_script(stack: Stack) -> None:
    import redis

    assert stack.redis_url is not None
    store = RedisStore(parse_backend(stack.redis_url), operation_timeout=2.0)
    raw = redis.Redis.from_url(stack.redis_url)
    try:
        store.store(fill(init=[(k("sync-table"), b"t1", None)]))
        assert raw.get(k("entry")) == b"payload"
        assert raw.get(k("sync-table")) == b"t1"
    finally:
        for key in raw.scan_iter(f"{PREFIX}:*"):
            raw.delete(key)
        raw.close()
        store.close()
