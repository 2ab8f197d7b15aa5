"""Integration tests run on the real PostgreSQL (asyncpg) and the real Redis.

When a service is unreachable they skip with a message saying which, except under CI=true, where
they fail: CI must never pass by skipping what it was meant to check.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from integration.clusterkit import redis_cluster  # noqa: F401 - the session's local cluster
from tests.fixtures import Stack

PG_URL = os.environ.get("SQLACACHE_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SQLACACHE_TEST_REDIS", "redis://127.0.0.1:6379/9")


async def _probe() -> list[str]:
    problems = []
    try:
        import asyncpg

        dsn = PG_URL.replace("postgresql+asyncpg", "postgresql")
        conn = await asyncio.wait_for(asyncpg.connect(dsn), 5)
        await conn.close()
    except Exception as exc:
        problems.append(f"PostgreSQL at {PG_URL}: {type(exc).__name__}: {exc}")
    try:
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL, socket_connect_timeout=2)
        await client.ping()
        await client.aclose()
    except Exception as exc:
        problems.append(f"Redis at {REDIS_URL}: {type(exc).__name__}: {exc}")
    return problems


_problems: list[str] | None = None


def services_problems() -> list[str]:
    global _problems
    if _problems is None:
        _problems = asyncio.run(_probe())
    return _problems


@pytest.fixture
def stack() -> Stack:
    problems = services_problems()
    if problems:
        message = "integration services unreachable: " + "; ".join(problems)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(message + " (start them, e.g. `docker compose up -d`)")
    return Stack(name="redis", db_url=PG_URL, backend=REDIS_URL, redis_url=REDIS_URL)
