"""The README's Quickstart, as a file that runs: `pip install sqlacache aiosqlite`, then
`python quickstart.py`. Set DATABASE_URL and CACHE_URL to run it on PostgreSQL and Redis
(`postgresql+asyncpg://...`, `redis://localhost:6379/1`, with `pip install "sqlacache[redis]" asyncpg`).
"""

# --- quickstart ---
import asyncio
import os

from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlacache import configure


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "quickstart_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    active: Mapped[bool] = mapped_column(default=True)


engine = create_async_engine(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///quickstart.db"))
cache = configure(
    backend=os.environ.get("CACHE_URL", "mem://"),  # "redis://localhost:6379/1" in production
    models={
        User: {"ops": {"get", "fetch"}, "timeout": 900},  # or the dotted path "app.models.User"
        "*": {"timeout": 3600},  # every other mapped model
    },
)


async def main() -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await cache.bind(engine)

    async with AsyncSession(engine) as session:
        session.add(User(id=42, name="Ada"))
        await session.commit()

    async with AsyncSession(engine) as session:
        user = await session.get(User, 42)  # miss: one SELECT, stored

    async with AsyncSession(engine) as session:
        user = await session.get(User, 42)  # hit: no SQL
        users = (await session.execute(select(User).where(User.active))).scalars().all()

    async with AsyncSession(engine) as session:
        user = await session.get(User, 42)
        user.name = "Alice"
        await session.commit()  # evicts every cached read of this row, in every process

    async with AsyncSession(engine) as session:
        user = await session.get(User, 42)  # fresh: "Alice"

    totals = cache.stats()["totals"]
    print(f"{user.name}; {len(users)} active; {totals['hits']} hits, {totals['misses']} misses")
    await cache.disconnect()
    await engine.dispose()


asyncio.run(main())
# --- end ---
