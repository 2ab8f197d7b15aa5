"""Fixtures shared by tests/ and integration/: the only difference is the `stack` fixture.

tests/conftest.py provides a mem:// + SQLite stack; integration/conftest.py a Redis + PostgreSQL one.
Hits are proven by counting SQL statements with an engine event, never by timing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

import sqlacache
from tests import catalog  # noqa: F401 - registers the catalog tables
from tests.models import Base


@dataclass
class Stack:
    """Where the database and the cache live for a test run."""

    name: str
    db_url: str
    backend: str
    redis_url: str | None = None


@dataclass
class SQLCounter:
    """Counts the SQL statements an engine sends; `count` of SELECTs only."""

    statements: list[str] = field(default_factory=list)

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def selects(self) -> int:
        return sum(1 for s in self.statements if s.lstrip().upper().startswith(("SELECT", "WITH")))

    def reset(self) -> None:
        self.statements.clear()


async def create_engine_for(stack: Stack) -> AsyncEngine:
    engine = create_async_engine(stack.db_url)
    if stack.db_url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _fk_on(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


async def reset_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


@pytest.fixture
async def engine(stack: Stack) -> AsyncIterator[AsyncEngine]:
    engine = await create_engine_for(stack)
    await reset_schema(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def sql(engine: AsyncEngine) -> SQLCounter:
    counter = SQLCounter()
    event.listen(engine.sync_engine, "before_cursor_execute", counter)
    return counter


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


CacheFactory = Callable[..., Awaitable[sqlacache.CacheManager]]


@pytest.fixture
async def make_cache(stack: Stack, engine: AsyncEngine) -> AsyncIterator[CacheFactory]:
    """Build caches with a unique prefix, bound to the test engine; all unbound at teardown."""
    made: list[sqlacache.CacheManager] = []

    async def make(
        models: Any = None, *, bind: bool = True, **kwargs: Any
    ) -> sqlacache.CacheManager:
        kwargs.setdefault("prefix", f"t{uuid.uuid4().hex[:10]}")
        kwargs.setdefault("backend", stack.backend)
        cache = sqlacache.configure(
            models={"*": {"timeout": 300}} if models is None else models, **kwargs
        )
        made.append(cache)
        if bind:
            await cache.bind(engine)
        return cache

    yield make
    for cache in made:
        await cache.disconnect()
    if stack.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(stack.redis_url)
        for cache in made:
            keys = [k async for k in client.scan_iter(match=f"{cache.config.prefix}:*", count=1000)]
            if keys:
                await client.unlink(*keys)
        await client.aclose()


@pytest.fixture
async def cache(make_cache: CacheFactory) -> sqlacache.CacheManager:
    return await make_cache()
