"""The store's Lua scripts on the real Redis: what a fill creates, keeps and refuses.

A fill writes its entry and the version keys it needs in one script (lua/fill.lua). These tests
drive RedisStore directly, so each rule of the script is checked on its own: row versions are
created only if absent (and, for a slow fill, only if their table's version is unchanged), table
versions never overwritten, TTLs only raised, and a server that lost its scripts still answers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sqlacache.backends.base import Bump, Fill
from sqlacache.backends.redis import RedisStore
from sqlacache.config import parse_backend
from sqlacache.keys import FAST_FILL_SECONDS
from tests.fixtures import Stack

PREFIX = "sqlacache-script-test"


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


def k(name: str) -> str:
    return f"{PREFIX}:{name}"


def fill(**changes: object) -> Fill:
    base: dict[str, object] = {
        "entry_key": k("entry"),
        "value": b"payload",
        "ttl_ms": 60_000,
        "extend_ms": 30_000,
        "captured_at": time.monotonic(),
    }
    base.update(changes)
    return Fill(**base)  # type: ignore[arg-type]


async def test_fill_writes_entry_and_creates_only_missing_versions(
    redis_pair: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, raw = redis_pair
    await raw.set(k("table-old"), b"existing")
    await raw.set(k("row-old"), b"existing", px=60_000)
    await store.store_async(
        fill(
            init=[(k("table-new"), b"t1", None), (k("table-old"), b"existing", None)],
            init_rows=[
                (k("row-new"), b"r1", k("table-new"), None, b""),
                (k("row-old"), b"existing", k("table-old"), b"existing", b""),
            ],
        )
    )
    assert await raw.get(k("entry")) == b"payload"
    assert 59_000 < await raw.pttl(k("entry")) <= 60_000
    assert await raw.get(k("table-new")) == b"t1"
    assert await raw.pttl(k("table-new")) == -1, "table versions never expire"
    assert await raw.get(k("table-old")) == b"existing", "a table version is never overwritten"
    assert await raw.get(k("row-new")) == b"r1"
    assert 29_000 < await raw.pttl(k("row-new")) <= 30_000


@pytest.mark.parametrize("version", ["table", "row"])
async def test_fill_never_overwrites_versions_nor_stores_an_entry_they_invalidate(
    redis_pair: tuple[RedisStore, aioredis.Redis], version: str
) -> None:
    """Another process initialised the version first (two fills at once): its entry stays."""
    store, raw = redis_pair
    await raw.set(k("entry"), b"the other process's entry")
    await raw.set(k(version), b"theirs", px=60_000)
    if version == "table":
        await store.store_async(fill(init=[(k("table"), b"ours", None)]))
    else:
        await store.store_async(fill(init_rows=[(k("row"), b"ours", k("table"), None, b"")]))
    assert await raw.get(k(version)) == b"theirs", "a version is never overwritten"
    assert await raw.get(k("entry")) == b"the other process's entry"


async def test_fill_only_raises_row_version_ttls(
    redis_pair: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, raw = redis_pair
    await raw.set(k("short"), b"v", px=1_000)
    await raw.set(k("long"), b"v", px=120_000)
    await store.store_async(fill(extend=[k("short"), k("long"), k("absent")]))
    assert 29_000 < await raw.pttl(k("short")) <= 30_000
    assert await raw.pttl(k("long")) > 100_000, "a longer TTL is never shortened"
    assert await raw.exists(k("absent")) == 0, "extending never creates a key"


@pytest.mark.parametrize(
    ("table_now", "seen", "planned", "created"),
    [
        (b"v1", b"v1", b"", True),  # unchanged since the reader saw it
        (b"v2", b"v1", b"", False),  # a write moved the table on: the row may have changed
        (None, None, b"", True),  # never written, still never written
        (b"p1", None, b"p1", True),  # created meanwhile by this process's own fill
        (b"w1", None, b"p1", False),  # created meanwhile by a write
    ],
)
async def test_slow_fill_creates_row_versions_only_under_an_unchanged_table_version(
    redis_pair: tuple[RedisStore, aioredis.Redis],
    table_now: bytes | None,
    seen: bytes | None,
    planned: bytes,
    created: bool,
) -> None:
    store, raw = redis_pair
    if table_now is not None:
        await raw.set(k("table"), table_now)
    slow = time.monotonic() - FAST_FILL_SECONDS - 1
    await store.store_async(
        fill(captured_at=slow, init_rows=[(k("row"), b"r1", k("table"), seen, planned)])
    )
    assert (await raw.get(k("row")) == b"r1") is created
    stored = await raw.get(k("entry")) == b"payload"
    assert stored is created, "an entry whose row version was refused could never validate"


async def test_fast_fill_is_not_guarded(redis_pair: tuple[RedisStore, aioredis.Redis]) -> None:
    store, raw = redis_pair
    await raw.set(k("table"), b"v2")
    await store.store_async(fill(init_rows=[(k("row"), b"r1", k("table"), b"v1", b"")]))
    assert await raw.get(k("row")) == b"r1"


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
