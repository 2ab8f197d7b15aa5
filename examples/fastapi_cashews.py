"""A FastAPI endpoint cached with cashews' own decorator that stays fresh through ORM writes.

`uvicorn examples.fastapi_cashews:app --workers 4`. `configure(cashews=app_cache)` makes every
commit delete the cashews tags `users:{id}` and `users` of what it wrote, in every worker: the
endpoints below never call `delete_tags`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cashews import cache as app_cache
from fastapi import FastAPI, HTTPException
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlacache import configure


class Base(DeclarativeBase):
    pass


class Profile(Base):
    __tablename__ = "example_profiles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


engine = create_async_engine(
    os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@localhost/test")
)
session_maker = async_sessionmaker(engine, expire_on_commit=False)
# The application's cache: in-process here (each worker its own); "redis://..." shares it.
app_cache.setup(os.environ.get("APP_CACHE_URL", "mem://"))
cache = configure(
    backend=os.environ.get("CACHE_URL", "redis://localhost:6379/1"),
    models={"examples.fastapi_cashews.Profile": {"timeout": 300}},
    cashews=app_cache,  # commits delete the tags {table}:{pk} and {table}
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await cache.bind(engine)
    yield
    await cache.disconnect()
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/profiles/count")
@app_cache(ttl="10m", key="profiles:count", tags=["example_profiles"])
async def count_profiles() -> dict[str, int]:
    async with session_maker() as session:
        return {"count": await session.scalar(select(func.count()).select_from(Profile)) or 0}


@app.get("/profiles/{profile_id}")
@app_cache(ttl="10m", key="profile:{profile_id}", tags=["example_profiles:{profile_id}"])
async def get_profile(profile_id: int) -> dict[str, object]:
    async with session_maker() as session:
        profile = await session.get(Profile, profile_id)
        if profile is None:
            raise HTTPException(404)
        return {"id": profile.id, "name": profile.name}


@app.put("/profiles/{profile_id}/{name}")
async def put_profile(profile_id: int, name: str) -> dict[str, str]:
    async with session_maker() as session:
        profile = await session.get(Profile, profile_id)
        if profile is None:
            session.add(Profile(id=profile_id, name=name))
        else:
            profile.name = name
        await session.commit()  # deletes example_profiles:{id} and example_profiles from cashews
    return {"status": "ok"}
