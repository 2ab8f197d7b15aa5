"""Isolation: prefixes, databases, schemas and key contexts never share entries."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from tests.fixtures import create_engine_for, reset_schema
from tests.models import User


@pytest.fixture
async def users(sessions):
    async with sessions() as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        await s.commit()


async def get_name(engine, pk, info=None):
    async with AsyncSession(engine) as s:
        if info:
            s.info.update(info)
        user = await s.get(User, pk)
        return user.name if user else None


async def test_two_prefixes_never_see_each_others_entries(make_cache, users, engine, sql):
    first = await make_cache(prefix="app")
    await get_name(engine, 1)
    await first.disconnect()
    await make_cache(prefix="app2")
    sql.reset()
    await get_name(engine, 1)
    assert sql.selects == 1


async def test_invalidate_all_touches_only_its_own_prefix(stack, make_cache, users, engine, sql):
    if stack.redis_url is None:
        pytest.skip("mem:// stores belong to one cache object; prefixes matter on a shared backend")
    other = await make_cache(prefix="iso2")
    await get_name(engine, 2)  # filled under iso2
    await other.disconnect()
    mine = await make_cache(prefix="iso")
    await get_name(engine, 2)  # filled under iso
    await mine.invalidate_all()
    await mine.disconnect()
    again = await make_cache(prefix="iso2")
    sql.reset()
    await get_name(engine, 2)
    assert sql.selects == 0  # iso2's entry survived iso's invalidate_all
    await again.disconnect()


async def test_invalidate_all_leaves_foreign_keys_in_the_same_redis_database(
    stack, make_cache, users, engine
):
    if stack.redis_url is None:
        pytest.skip("needs a shared Redis")
    import redis.asyncio as aioredis

    client = aioredis.from_url(stack.redis_url)
    await client.set("someone:else:key", b"keep me")
    await client.set("app:e:not-ours-either", b"keep me too")  # a prefix that merely starts alike
    cache = await make_cache(prefix="ap")
    await get_name(engine, 1)
    await cache.invalidate_all()
    assert await client.get("someone:else:key") == b"keep me"
    assert await client.get("app:e:not-ours-either") == b"keep me too"
    assert not [k async for k in client.scan_iter(match="ap:e:*")]
    await client.delete("someone:else:key", "app:e:not-ours-either")
    await client.aclose()


async def test_two_databases_sharing_a_backend_never_share_entries(
    stack, make_cache, tmp_path, engine
):
    if stack.db_url.startswith("sqlite"):
        other_url = f"sqlite+aiosqlite:///{tmp_path}/other.sqlite"
    else:
        other_url = await _second_postgres_database(stack.db_url)
    from tests.fixtures import Stack

    other = await create_engine_for(Stack("other", other_url, stack.backend))
    await reset_schema(other)
    try:
        async with AsyncSession(engine) as s:
            s.add(User(id=1, name="in first"))
            await s.commit()
        async with AsyncSession(other) as s:
            s.add(User(id=1, name="in second"))
            await s.commit()
        cache = await make_cache()
        await cache.bind(other)
        assert await get_name(engine, 1) == "in first"
        assert await get_name(other, 1) == "in second"
        assert await get_name(engine, 1) == "in first"
        assert await get_name(other, 1) == "in second"
        assert len(cache.stats()["databases"]) == 2
    finally:
        await other.dispose()


async def _second_postgres_database(url: str) -> str:
    from sqlalchemy.ext.asyncio import create_async_engine

    base, _, _ = url.rpartition("/")
    admin = create_async_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        found = await conn.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = 'sqlacache_other'")
        )
        if not found:
            await conn.execute(text("CREATE DATABASE sqlacache_other"))
    await admin.dispose()
    return f"{base}/sqlacache_other"


async def test_database_id_overrides_the_identity(make_cache, users, engine):
    cache = await make_cache(bind=False)
    await cache.bind(engine, database_id="replica-set-1")
    await get_name(engine, 1)
    assert cache.stats()["databases"] == ["replica-set-1"]


async def test_key_context_separates_entries(make_cache, users, engine, sql):
    await make_cache(key_context=lambda state: state.session.info.get("tenant"))
    await get_name(engine, 1, {"tenant": "a"})
    sql.reset()
    await get_name(engine, 1, {"tenant": "a"})
    assert sql.selects == 0
    await get_name(engine, 1, {"tenant": "b"})
    assert sql.selects == 1


async def test_schema_translate_map_separates_tenants(stack, make_cache, engine, sql):
    if stack.db_url.startswith("sqlite"):
        pytest.skip("SQLite has no schemas to translate to")
    metadata = MetaData()
    accounts = Table(
        "accounts", metadata, Column("id", Integer, primary_key=True), Column("name", String(20))
    )
    async with engine.begin() as conn:
        for tenant in ("tenant_a", "tenant_b"):
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {tenant} CASCADE"))
            await conn.execute(text(f"CREATE SCHEMA {tenant}"))
            tenant_conn = await conn.execution_options(schema_translate_map={None: tenant})
            await tenant_conn.run_sync(metadata.create_all)
            await tenant_conn.execute(accounts.insert().values(id=1, name=tenant))

    from sqlalchemy.orm import registry

    mapper_registry = registry()

    class Account:
        pass

    mapper_registry.map_imperatively(Account, accounts)
    try:
        await make_cache({Account: {}})

        async def read(tenant):
            async with AsyncSession(engine) as s:
                stmt = select(Account).execution_options(schema_translate_map={None: tenant})
                return [a.name for a in (await s.execute(stmt)).scalars()]

        assert await read("tenant_a") == ["tenant_a"]
        assert await read("tenant_b") == ["tenant_b"]
        sql.reset()
        assert await read("tenant_a") == ["tenant_a"]
        assert await read("tenant_b") == ["tenant_b"]
        assert sql.selects == 0
        async with AsyncSession(engine) as s:
            await s.execute(
                accounts.update().values(name="renamed"),
                execution_options={"schema_translate_map": {None: "tenant_a"}},
            )
            await s.commit()
        sql.reset()
        assert await read("tenant_a") == ["renamed"]
        assert await read("tenant_b") == ["tenant_b"]
        assert sql.selects == 1  # tenant_b's entry was not touched by tenant_a's write
    finally:
        mapper_registry.dispose()
        async with engine.begin() as conn:
            for tenant in ("tenant_a", "tenant_b"):
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {tenant} CASCADE"))
