"""A FastAPI service with sqlacache: `uvicorn examples.fastapi_app:app --workers 4`.

Install: `pip install "sqlacache[examples]"` (FastAPI, uvicorn, asyncpg, redis-py); start PostgreSQL
and Redis with `docker compose up -d`. Every worker shares the Redis cache; a commit in one worker
makes the next read fresh in all of them.

Environment:
  DATABASE_URL  SQLAlchemy async URL (default postgresql+asyncpg://postgres@localhost/test)
  CACHE_URL     sqlacache backend (default redis://localhost:6379/1; mem:// for one process)

Routes (the table is created, and seeded with users 1-3, at start-up if it is empty):
  GET  /users/{user_id}                 one user (a `get`: cached after the first request)
  GET  /users                           active users (a `fetch`: cached)
  GET  /stats                           user count (a `count`: cached) and this worker's counters
  POST /users/{user_id}/rename/{name}   create or rename a user; the commit evicts what it staled

    curl localhost:8000/users/1; curl localhost:8000/users/1      # the second: no SQL
    curl -X POST localhost:8000/users/1/rename/ada; curl localhost:8000/users/1
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlacache import configure


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    active: Mapped[bool] = mapped_column(default=True)


SEED = [(1, "ada"), (2, "grace"), (3, "linus")]

engine = create_async_engine(
    os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@localhost/test")
)
session_maker = async_sessionmaker(engine, expire_on_commit=False)
cache = configure(
    backend=os.environ.get("CACHE_URL", "redis://localhost:6379/1"),
    models={"examples.fastapi_app.User": {"ops": "all", "timeout": 300}},
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await cache.bind(engine)
    await seed()
    yield
    await cache.disconnect()
    await engine.dispose()


async def seed() -> None:
    """Users 1-3, if the table is empty (so the routes have something to show)."""
    async with session_maker() as session:
        if not await session.scalar(select(func.count()).select_from(User)):
            session.add_all([User(id=pk, name=name) for pk, name in SEED])
            await session.commit()


app = FastAPI(lifespan=lifespan)


async def get_session() -> AsyncIterator[AsyncSession]:
    async with session_maker() as session:
        yield session


# FastAPI's own idiom for a shared dependency: a type alias, not a call in every default.
SessionDep = Annotated[AsyncSession, Depends(get_session)]


@app.get("/users/{user_id}")
async def get_user(user_id: int, session: SessionDep) -> dict[str, object]:
    user = await session.get(User, user_id)  # cached after the first request
    if user is None:
        raise HTTPException(404)
    return {"id": user.id, "name": user.name, "active": user.active}


@app.get("/users")
async def list_users(session: SessionDep) -> list[dict[str, object]]:
    users = (await session.execute(select(User).where(User.active).order_by(User.id))).scalars()
    return [{"id": u.id, "name": u.name} for u in users]


@app.get("/stats")
async def stats(session: SessionDep) -> dict[str, object]:
    count = await session.scalar(select(func.count()).select_from(User))
    return {"users": count, "cache": cache.stats()["totals"]}


@app.post("/users/{user_id}/rename/{name}")
async def rename(user_id: int, name: str, session: SessionDep) -> dict[str, str]:
    user = await session.get(User, user_id)
    if user is None:
        user = User(id=user_id, name=name)
        session.add(user)
    user.name = name
    await session.commit()  # evicts what this made stale, in every worker
    return {"status": "ok"}
