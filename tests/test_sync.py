"""The synchronous API: a sync `Session` on a sync `Engine`, same config and guarantees."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, event, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import sqlacache
from tests.fixtures import SQLCounter, Stack
from tests.models import Base, Order, User


def sync_url(stack: Stack) -> str:
    return stack.db_url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


@pytest.fixture
def sync_engine(stack: Stack) -> Iterator[Engine]:
    engine = create_engine(sync_url(stack))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2, 3)])
        s.add(Order(id=1, user_id=1, total=5))
        s.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def sync_cache(stack: Stack, sync_engine: Engine) -> Iterator[sqlacache.CacheManager]:
    cache = sqlacache.configure(
        stack.backend, models={"*": {"timeout": 300}}, prefix=f"sync{id(sync_engine)}"
    )
    cache.bind_sync(sync_engine)
    yield cache
    cache.invalidate_all_sync()
    cache.disconnect_sync()


@pytest.fixture
def counter(sync_engine: Engine) -> SQLCounter:
    counter = SQLCounter()
    event.listen(sync_engine, "before_cursor_execute", counter)
    return counter


def test_sync_sessions_are_cached_and_fresh_after_commit(sync_cache, sync_engine, counter):
    sessions = sessionmaker(sync_engine, expire_on_commit=False)
    stmt = select(User).order_by(User.id)
    with sessions() as s:
        assert s.get(User, 1).name == "user1"
        assert [u.name for u in s.scalars(stmt)] == ["user1", "user2", "user3"]
    counter.reset()
    with sessions() as s:
        assert s.get(User, 1).name == "user1"
        assert [u.name for u in s.scalars(stmt)] == ["user1", "user2", "user3"]
        assert s.scalar(select(func.count()).select_from(User)) == 3
    assert counter.selects == 1  # only the count, on its first run
    with sessions() as s:
        s.get(User, 1).name = "alice"
        s.commit()
    with sessions() as s:
        assert s.get(User, 1).name == "alice"
        assert [u.name for u in s.scalars(stmt)] == ["alice", "user2", "user3"]


def test_sync_bulk_and_core_writes_invalidate(sync_cache, sync_engine):
    with Session(sync_engine) as s:
        s.get(User, 2)
    with sync_engine.begin() as conn:
        conn.execute(update(User.__table__).where(User.__table__.c.id == 2).values(name="core"))
    with Session(sync_engine) as s:
        assert s.get(User, 2).name == "core"
        s.execute(update(User).values(active=False))
        s.commit()
    with Session(sync_engine) as s:
        assert s.get(User, 2).active is False


def test_sync_manual_control(sync_cache, sync_engine, counter):
    with Session(sync_engine) as s:
        s.get(User, 3)
        s.execute(text("UPDATE users SET name = 'raw' WHERE id = 3"))
        s.commit()
    sync_cache.invalidate_sync(User, pks=[3])
    with Session(sync_engine) as s:
        assert s.get(User, 3).name == "raw"
    stmt = select(User).where(User.id > 1).order_by(User.id)
    with Session(sync_engine) as s:
        sync_cache.execute_sync(s, stmt, timeout=60).scalars().all()
    counter.reset()
    with Session(sync_engine) as s:
        assert len(sync_cache.execute_sync(s, stmt).scalars().all()) == 2
    assert counter.selects == 0


def test_concurrent_threads_missing_one_key_run_one_query(sync_cache, sync_engine, counter):
    barrier = threading.Barrier(8)
    names: list[str] = []

    def read() -> None:
        with Session(sync_engine) as s:
            barrier.wait()
            names.append(s.get(User, 1).name)

    counter.reset()
    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert names == ["user1"] * 8
    assert counter.selects == 1  # one leader queries; the others wait for its result or hit


def test_legacy_query_aggregates_are_cached_not_broken(sync_cache, sync_engine, counter):
    """Issue 9 item 11: `Query.count()` and `Query(func.max(...)).scalar()` raised IndexError."""

    def read() -> tuple[int, int | None]:
        with Session(sync_engine) as s:
            return s.query(User).count(), s.query(func.max(User.id)).scalar()

    assert read() == (3, 3)
    counter.reset()
    assert read() == (3, 3)
    assert counter.selects == 0
    assert sync_cache.stats()["internal_errors"] == {}
