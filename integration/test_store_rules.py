"""tests/test_store_rules.py on the real Redis too: the Lua scripts keep the same rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from sqlacache.backends.redis import RedisStore
from sqlacache.config import parse_backend
from tests.fixtures import Stack
from tests.test_store_rules import *  # noqa: F403
from tests.test_store_rules import PREFIX, MemoryProbe


class RedisProbe:
    """Reads and seeds keys on the real Redis beside a RedisStore."""

    def __init__(self, url: str) -> None:
        self.store = RedisStore(parse_backend(url), operation_timeout=2.0)
        self.raw = aioredis.from_url(url)

    async def get(self, key: str) -> bytes | None:
        return await self.raw.get(key)

    async def set(self, key: str, value: bytes, px: int | None = None) -> None:
        await self.raw.set(key, value, px=px)

    async def pttl(self, key: str) -> int:
        return int(await self.raw.pttl(key))

    async def clear(self) -> None:
        keys = [key async for key in self.raw.scan_iter(f"{PREFIX}:*")]
        if keys:
            await self.raw.delete(*keys)

    async def close(self) -> None:
        await self.clear()
        await self.raw.aclose()
        await self.store.aclose()


@pytest.fixture(params=["memory", "redis"])
async def probe(request: Any, stack: Stack) -> AsyncIterator[Any]:
    if request.param == "memory":
        made: Any = MemoryProbe()
    else:
        assert stack.redis_url is not None
        made = RedisProbe(stack.redis_url)
        await made.clear()
    yield made
    await made.close()
