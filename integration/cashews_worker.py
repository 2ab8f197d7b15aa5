"""A second OS process whose application cache is cashews on mem:// (integration tests).

    python integration/cashews_worker.py DB_URL BACKEND PREFIX

It caches `user_name(user_id)` with cashews' own decorator, tagged `users:{user_id}`, and answers
`get <id>` on stdin with `<name> <calls>` (calls: how often the function body ran).
"""

from __future__ import annotations

import asyncio
import sys

from cashews import Cache
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import sqlacache
from tests.models import User


async def main(db_url: str, backend: str, prefix: str) -> None:
    app_cache = Cache()
    app_cache.setup("mem://")
    engine = create_async_engine(db_url)
    cache = sqlacache.configure(backend, {"*": {"timeout": 300}}, prefix=prefix, cashews=app_cache)
    await cache.bind(engine)
    calls = 0

    @app_cache(ttl="10m", key="user:{user_id}", tags=["users:{user_id}"])
    async def user_name(user_id: int) -> str:
        nonlocal calls
        calls += 1
        async with AsyncSession(engine) as session:
            user = await session.get(User, user_id)
            return "-" if user is None else user.name

    listener = cache._bound.tag_listener
    while listener is None or not listener.mirror.fresh():
        await asyncio.sleep(0.01)
        listener = cache._bound.tag_listener
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            break
        name = await user_name(int(line.split()[1]))
        print(f"{name} {calls}", flush=True)
    print(cache.stats()["cashews"], flush=True)
    await cache.disconnect()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
