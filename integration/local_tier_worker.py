"""A writer or reader OS process for the local-tier tests (integration/test_local_tier.py).

    python integration/local_tier_worker.py writer DB_URL BACKEND PREFIX COMMITS INTERVAL
    python integration/local_tier_worker.py reader DB_URL BACKEND PREFIX SECONDS HEARTBEAT

The writer sets users.id=1's name to "1", "2", ... and prints `C <n> <monotonic time>` as each
commit returns. A reader with the local tier reads that row in a loop (`get` and a `fetch`), and
prints one JSON line with every read: (start, end, value seen, served locally). CLOCK_MONOTONIC is
system-wide on Linux, so the times of both processes compare.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import sqlacache
from tests.models import User


async def writer(db_url: str, backend: str, prefix: str, commits: int, interval: float) -> None:
    engine = create_async_engine(db_url)
    cache = sqlacache.configure(backend, {"*": {"timeout": 300}}, prefix=prefix)
    await cache.bind(engine)
    tokens: list[bytes] = []  # the token of every bump this process sends, in order
    store: Any = cache._bound.runtime.store.raw  # type: ignore[union-attr]
    bump_async = store.bump_async

    async def recorded(bump: Any, token: bytes, *args: Any) -> None:
        tokens.append(token)
        await bump_async(bump, token, *args)

    store.bump_async = recorded
    print("READY", flush=True)
    sys.stdin.readline()
    for n in range(1, commits + 1):
        async with AsyncSession(engine) as session:
            user = await session.get(User, 1)
            assert user is not None
            user.name = str(n)
            await session.commit()
        # the last bump before commit() returned is the commit's own
        print(f"C {n} {time.monotonic()!r} {tokens[-1].decode()}", flush=True)
        await asyncio.sleep(interval)
    await cache.disconnect()
    await engine.dispose()


async def reader(db_url: str, backend: str, prefix: str, seconds: float, heartbeat: float) -> None:
    engine = create_async_engine(db_url)
    cache = sqlacache.configure(
        backend, {"*": {"timeout": 300}}, prefix=prefix, local=True, local_heartbeat=heartbeat
    )
    await cache.bind(engine)
    tier = cache._bound.local_tier
    assert tier is not None
    while not tier.mirror.fresh():
        await asyncio.sleep(0.01)
    applied: dict[str, float] = {}  # token -> when its message reached the mirror
    on_message = tier.on_message

    def timed(epoch: int, data: bytes) -> None:
        on_message(epoch, data)
        if data[:1] == b"v":
            applied[data[1:].split(b"\n", 1)[0].decode()] = time.monotonic()

    tier.on_message = timed  # type: ignore[method-assign]
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    stop = loop.run_in_executor(None, sys.stdin.readline)  # "stop", or the deadline
    reads: list[tuple[float, float, int, bool, str]] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and not stop.done():
        n += 1
        before = tier.hits
        start = time.monotonic()
        async with AsyncSession(engine) as session:
            if n % 2:
                user = await session.get(User, 1)
                assert user is not None
                name = user.name
                op = "get"
            else:
                name = (await session.execute(select(User.name).where(User.id == 1))).scalar_one()
                op = "fetch"
        end = time.monotonic()
        reads.append((start, end, int(name), tier.hits > before, op))
        await asyncio.sleep(0.0005)
    stats = cache.stats()
    out = {"reads": reads, "applied": applied, "local": stats.get("local")}
    print(json.dumps(out), flush=True)
    await stop
    await cache.disconnect()
    await engine.dispose()


def main() -> None:
    mode, db_url, backend, prefix = sys.argv[1:5]
    if mode == "writer":
        asyncio.run(writer(db_url, backend, prefix, int(sys.argv[5]), float(sys.argv[6])))
    else:
        asyncio.run(reader(db_url, backend, prefix, float(sys.argv[5]), float(sys.argv[6])))


if __name__ == "__main__":
    main()
