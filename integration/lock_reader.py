"""One of several processes in the fill-lock test: 20 concurrent cold reads of one key.

Prints READY once bound, waits for a line on stdin, runs the reads, prints the number of SQL
SELECTs it sent.
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import sqlacache
from tests.models import User


async def main(db_url: str, backend: str, prefix: str) -> None:
    engine = create_async_engine(db_url)
    cache = sqlacache.configure(backend, models={"*": {"lock": True, "timeout": 60}}, prefix=prefix)
    await cache.bind(engine)
    selects = []
    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *a: selects.append(statement) if "FROM users" in statement else None,
    )
    async with AsyncSession(engine) as warm:  # open a pooled connection before the race
        await warm.connection()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def read() -> str:
        async with AsyncSession(engine) as session:
            return (await session.get(User, 1)).name

    names = await asyncio.gather(*(read() for _ in range(20)))
    summary = "user1*20" if names == ["user1"] * 20 else ",".join(names)
    print(f"QUERIES {len(selects)} names={summary}", flush=True)
    await cache.disconnect()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
