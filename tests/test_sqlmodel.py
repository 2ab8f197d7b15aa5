"""SQLModel works unchanged: `AsyncSession.exec(select(...))` and `get` are cached."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession


class Hero(SQLModel, table=True):
    __tablename__ = "sqlmodel_heroes"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    age: int | None = None


@pytest.fixture
async def heroes(engine: AsyncEngine) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.drop_all, tables=[Hero.__table__])
        await conn.run_sync(SQLModel.metadata.create_all, tables=[Hero.__table__])
    async with AsyncSession(engine) as session:
        session.add_all([Hero(id=1, name="Deadpond", age=30), Hero(id=2, name="Spider-Boy")])
        await session.commit()
    yield


async def test_sqlmodel_exec_and_get_are_cached_and_invalidated(make_cache, heroes, engine, sql):
    await make_cache({Hero: {"timeout": 60}})

    async def read():
        async with AsyncSession(engine) as session:
            heroes = (await session.exec(select(Hero).order_by(Hero.id))).all()
            one = await session.get(Hero, 1)
            return [h.name for h in heroes], one.age

    assert await read() == (["Deadpond", "Spider-Boy"], 30)
    sql.reset()
    assert await read() == (["Deadpond", "Spider-Boy"], 30)
    assert sql.selects == 0
    async with AsyncSession(engine) as session:
        hero = await session.get(Hero, 1)
        hero.age = 31
        await session.commit()
    assert await read() == (["Deadpond", "Spider-Boy"], 31)
