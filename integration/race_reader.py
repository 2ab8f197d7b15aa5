"""A reader in its own process for the cross-process fill-race test.

It reads user 1 through the cache, pausing after the database answered: it prints READ, waits for a
line on stdin, then lets the cache store its (by then stale) result and prints STORED <n>.
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.util import await_only

import sqlacache
from tests.models import User


async def main(db_url: str, backend: str, prefix: str) -> None:
    engine = create_async_engine(db_url)
    cache = sqlacache.configure(backend, models={"*": {"timeout": 300}}, prefix=prefix)
    await cache.bind(engine)
    loop = asyncio.get_running_loop()
    armed = True

    def pause(conn, cursor, statement, *args):
        nonlocal armed
        if armed and statement.lstrip().upper().startswith("SELECT") and "users" in statement:
            armed = False
            print("READ", flush=True)
            await_only(loop.run_in_executor(None, sys.stdin.readline))

    event.listen(engine.sync_engine, "after_cursor_execute", pause)
    async with AsyncSession(engine) as session:
        user = await session.get(User, 1)
        name = user.name
    await cache.flush_pending()  # entries are written in the background
    stores = cache.stats()["models"]["tests.models.User"]["get"]["stores"]
    print(f"STORED {stores} {name}", flush=True)
    await cache.disconnect()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
