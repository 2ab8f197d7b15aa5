""""Never down": every failure rule against real processes: PostgreSQL, private redis-servers that get
killed, and a TCP proxy that cuts or blackholes the cache's connection (see faultkit.py).

Hits are proven by counting SQL statements (`before_cursor_execute`), never by timing; only the
bounded-cost test (F2) measures time, with wide margins. Under CI=true these tests fail instead of
skipping when PostgreSQL or redis-server is missing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

import sqlacache
from integration.conftest import PG_URL, services_problems
from integration.faultkit import FaultProxy, ReaderProcess, RedisServer
from tests.fixtures import SQLCounter, Stack, create_engine_for
from tests.models import Role, User

OPERATION_TIMEOUT = 0.05
THRESHOLD = 3
PROBE_INTERVAL = 0.1

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def stack() -> Stack:
    """PostgreSQL from the environment; Redis is started by each test, so 6379 is not needed."""
    problems = [p for p in services_problems() if p.startswith("PostgreSQL")]
    if shutil.which("redis-server") is None:
        problems.append("redis-server is not on PATH")
    if problems:
        message = "fault-injection tests cannot run: " + "; ".join(problems)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(message)
    return Stack(name="faults", db_url=PG_URL, backend="unused: each test starts its own Redis")


class Lab:
    """Everything a fault test starts, torn down in the right order whatever happens."""

    def __init__(self, stack: Stack, engine: AsyncEngine, tmp_path: Path) -> None:
        self.stack = stack
        self.engine = engine
        self.tmp_path = tmp_path
        self.prefix = f"f{uuid.uuid4().hex[:10]}"
        self.servers: list[RedisServer] = []
        self.proxies: list[FaultProxy] = []
        self.caches: list[sqlacache.CacheManager] = []
        self.engines: list[AsyncEngine] = []
        self.readers: list[ReaderProcess] = []

    def redis(self, start: bool = True) -> RedisServer:
        server = RedisServer()
        self.servers.append(server)
        if start:
            server.start()
        return server

    async def proxy(self, server: RedisServer) -> FaultProxy:
        proxy = FaultProxy(server.port)
        self.proxies.append(proxy)
        return await proxy.start()

    async def cache(
        self, backend: str, *, engine: AsyncEngine | None = None, **options: Any
    ) -> sqlacache.CacheManager:
        options.setdefault("prefix", self.prefix)
        options.setdefault("operation_timeout", OPERATION_TIMEOUT)
        options.setdefault("breaker_threshold", THRESHOLD)
        options.setdefault("breaker_probe_interval", PROBE_INTERVAL)
        cache = sqlacache.configure(backend=backend, models={"*": {"timeout": 300}}, **options)
        self.caches.append(cache)
        await cache.bind(engine or self.engine)
        return cache

    async def second_engine(self) -> tuple[AsyncEngine, Sessions, SQLCounter]:
        """Another engine (another pool), as another process would have."""
        engine = await create_engine_for(self.stack)
        self.engines.append(engine)
        counter = SQLCounter()
        event.listen(engine.sync_engine, "before_cursor_execute", counter)
        return engine, async_sessionmaker(engine, expire_on_commit=False), counter

    async def reader_process(self, redis_url: str) -> ReaderProcess:
        reader = await ReaderProcess.start(
            pg_url=self.stack.db_url,
            redis_url=redis_url,
            prefix=self.prefix,
            stderr_path=self.tmp_path / f"reader{len(self.readers)}.stderr",
        )
        self.readers.append(reader)
        return reader

    async def close(self) -> None:
        for reader in self.readers:
            await reader.stop()
        for cache in self.caches:
            await cache.disconnect()
        for engine in self.engines:
            await engine.dispose()
        for proxy in self.proxies:
            await proxy.aclose()
        for server in self.servers:
            server.cleanup()


@pytest.fixture
async def lab(stack: Stack, engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(stack, engine, tmp_path)
    try:
        yield lab
    finally:
        await lab.close()


# -- helpers ----------------------------------------------------------------------------------------


async def seed(sessions: Sessions, n: int = 3) -> None:
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, n + 1)])
        s.add(Role(id=1, name="admin"))
        await s.commit()


async def user_name(sessions: Sessions, pk: int) -> str | None:
    async with sessions() as s:
        user = await s.get(User, pk)
        return None if user is None else user.name


async def role_name(sessions: Sessions, pk: int) -> str | None:
    async with sessions() as s:
        role = await s.get(Role, pk)
        return None if role is None else role.name


async def all_names(sessions: Sessions) -> list[str]:
    async with sessions() as s:
        return list((await s.scalars(select(User.name).order_by(User.id))).all())


async def rename(sessions: Sessions, pk: int, name: str) -> None:
    async with sessions() as s:
        user = await s.get(User, pk)
        assert user is not None
        user.name = name
        await s.commit()


async def database_name(engine: AsyncEngine, pk: int) -> str | None:
    """What PostgreSQL holds, read with Core (never cached)."""
    async with engine.connect() as conn:
        row = await conn.execute(text("SELECT name FROM users WHERE id = :id"), {"id": pk})
        return row.scalar()


def breaker_state(cache: sqlacache.CacheManager) -> str:
    return str(cache.stats()["circuit_breaker"]["state"])


async def wait_until_recovered(cache: sqlacache.CacheManager, timeout: float = 15.0) -> None:
    """Poll stats until the breaker is closed and nothing is left to redeliver."""
    deadline = time.monotonic() + timeout
    while True:
        stats = cache.stats()
        if stats["circuit_breaker"]["state"] == "closed" and stats["pending_invalidations"] == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"the cache did not recover within {timeout}s: "
                f"breaker={stats['circuit_breaker']}, pending={stats['pending_invalidations']}"
            )
        await asyncio.sleep(0.02)


async def assert_cached(sessions: Sessions, sql: SQLCounter, pk: int, expected: str) -> None:
    """`get` returns `expected`, and a second `get` in a new session issues no SQL (a hit)."""
    assert await user_name(sessions, pk) == expected
    sql.reset()
    assert await user_name(sessions, pk) == expected
    assert sql.selects == 0, f"expected a cache hit, the database saw {sql.statements}"


async def assert_from_database(sessions: Sessions, sql: SQLCounter, pk: int, expected: str) -> None:
    sql.reset()
    assert await user_name(sessions, pk) == expected
    assert sql.selects == 1, f"expected one database read, saw {sql.statements}"


async def commit_cancelled_after_commit(
    cache: sqlacache.CacheManager,
    sessions: Sessions,
    proxy: FaultProxy,
    pk: int,
    name: str,
    fault: Callable[[], None],
) -> asyncio.Task[None]:
    """Rename a user (flushed first, so the flush-time bump is done), inject `fault` into the
    proxy, commit, and cancel the task awaiting `session.commit()` once the database COMMIT is
    done and the post-commit bump is on its way to Redis (a client disconnect at that moment)."""
    committed = asyncio.Event()
    ours: list[Session] = []
    bump_sent: list[asyncio.Event] = []

    def on_commit(session: Session) -> None:  # runs before sqlacache's own after_commit listener
        if ours and session is ours[0]:
            committed.set()

    async def work() -> None:
        async with sessions() as s:
            ours.append(s.sync_session)
            user = await s.get(User, pk)
            assert user is not None
            user.name = name
            await s.flush()
            await cache.flush_pending()  # the flush-time bump (sent in the background) has landed
            fault()
            bump_sent.append(proxy.watch(b"EVALSHA"))  # the next script call: post-commit
            await s.commit()

    async def in_flight() -> None:
        await committed.wait()
        await bump_sent[0].wait()

    event.listen(Session, "after_commit", on_commit, insert=True)
    try:
        task = asyncio.ensure_future(work())
        waiter = asyncio.ensure_future(in_flight())
        await asyncio.wait({task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            pytest.fail(f"no COMMIT followed by a post-commit bump: {task!r}")
        task.cancel()
        await asyncio.wait({task}, timeout=20)
    finally:
        event.remove(Session, "after_commit", on_commit)
    assert task.done(), "the cancelled commit did not finish"
    if not task.cancelled():
        exc = task.exception()
        assert exc is None, f"commit() raised {exc!r} instead of being cancelled"
        pytest.fail(
            "the task awaiting commit() was cancelled while the post-commit bump was in flight, "
            "yet commit() returned normally: the cancellation was swallowed"
        )
    return task


# -- F1: Redis unreachable --------------------------------------------------------------------------


async def test_redis_down_at_bind_serves_the_database_then_caches_once_redis_is_up(
    lab: Lab, sessions: Sessions, sql: SQLCounter
) -> None:
    server = lab.redis(start=False)
    await seed(sessions)
    cache = await lab.cache(server.url)  # must not raise

    expected = "user1"
    for round_ in range(3):
        await assert_from_database(sessions, sql, 1, expected)
        await assert_from_database(sessions, sql, 1, expected)  # never cached while down
        expected = f"down{round_}"
        await rename(sessions, 1, expected)
        assert await user_name(sessions, 1) == expected
        assert await all_names(sessions) == [expected, "user2", "user3"]
    assert breaker_state(cache) == "open"

    server.start()
    await wait_until_recovered(cache)
    await assert_cached(sessions, sql, 1, expected)
    await assert_cached(sessions, sql, 2, "user2")
    await rename(sessions, 1, "up")
    await assert_cached(sessions, sql, 1, "up")


async def test_redis_killed_mid_run_reads_and_writes_stay_correct_and_caching_resumes(
    lab: Lab, sessions: Sessions, sql: SQLCounter
) -> None:
    server = lab.redis()
    cache = await lab.cache(server.url)
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")
    assert await all_names(sessions) == ["user1", "user2", "user3"]

    server.kill()
    await assert_from_database(sessions, sql, 1, "user1")
    await rename(sessions, 1, "alice")
    await assert_from_database(sessions, sql, 1, "alice")
    await rename(sessions, 2, "bob")
    assert await all_names(sessions) == ["alice", "bob", "user3"]
    assert await user_name(sessions, 2) == "bob"
    assert breaker_state(cache) == "open"

    server.restart()
    await wait_until_recovered(cache)
    await assert_cached(sessions, sql, 1, "alice")
    await assert_cached(sessions, sql, 2, "bob")
    assert await all_names(sessions) == ["alice", "bob", "user3"]
    await rename(sessions, 1, "carol")
    await assert_cached(sessions, sql, 1, "carol")


# -- F3/F4: a cut in the middle of a commit ---------------------------------------------------------


@pytest.mark.parametrize("moment", ["after_flush", "before_COMMIT"])
async def test_cut_during_a_commit_the_commit_succeeds_and_reads_after_restore_are_fresh(
    lab: Lab, engine: AsyncEngine, sessions: Sessions, sql: SQLCounter, moment: str
) -> None:
    """after_flush: before sqlacache's flush-time bump; before_COMMIT: after it, before the
    database COMMIT (the engine's `commit` event), so only the post-commit delivery is lost."""
    server = lab.redis()
    proxy = await lab.proxy(server)
    cache = await lab.cache(proxy.url)
    other_engine, other_sessions, other_sql = await lab.second_engine()
    await lab.cache(server.url, engine=other_engine)  # another process's view
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")
    await assert_cached(other_sessions, other_sql, 1, "user1")

    def cut(*_: Any) -> None:
        if not proxy.cuts:
            proxy.cut()

    async with sessions() as s:
        target: Any = s.sync_session if moment == "after_flush" else engine.sync_engine
        name = "after_flush" if moment == "after_flush" else "commit"
        event.listen(target, name, cut)
        try:
            user = await s.get(User, 1)
            assert user is not None
            user.name = "alice"
            await s.commit()  # must not raise
        finally:
            event.remove(target, name, cut)
    assert proxy.cuts == 1, "the cut hook did not fire"
    assert await database_name(engine, 1) == "alice"
    assert cache.stats()["pending_invalidations"] >= 1
    assert breaker_state(cache) == "open"

    await proxy.restore()
    assert await user_name(sessions, 1) == "alice"
    await wait_until_recovered(cache)
    assert await user_name(sessions, 1) == "alice"
    assert await user_name(sessions, 1) == "alice"
    assert await user_name(other_sessions, 1) == "alice"
    assert cache.stats()["redelivered_invalidations"] >= 1


async def test_caching_of_a_table_resumes_once_its_lost_post_commit_delivery_is_redelivered(
    lab: Lab, engine: AsyncEngine, sessions: Sessions, sql: SQLCounter
) -> None:
    """The flush-time bump took the table's write lease; the post-commit delivery that releases
    it is lost to a cut. After recovery the cache must work for that table again (F2/F3)."""
    server = lab.redis()
    proxy = await lab.proxy(server)
    cache = await lab.cache(proxy.url)
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")

    def cut(*_: Any) -> None:
        if not proxy.cuts:
            proxy.cut()

    event.listen(engine.sync_engine, "commit", cut)  # after the flush, before the COMMIT
    try:
        await rename(sessions, 1, "alice")
    finally:
        event.remove(engine.sync_engine, "commit", cut)
    assert proxy.cuts == 1

    await proxy.restore()
    await wait_until_recovered(cache)
    await assert_cached(sessions, sql, 1, "alice")


# -- F2: bounded cost -------------------------------------------------------------------------------


async def test_blackholed_redis_costs_at_most_the_timeout_per_request_then_nothing(
    lab: Lab, sessions: Sessions, sql: SQLCounter
) -> None:
    server = lab.redis()
    proxy = await lab.proxy(server)
    cache = await lab.cache(proxy.url)
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")

    async def timed_read(expected: str, **options: Any) -> float:
        start = time.perf_counter()
        async with sessions() as s:
            user = await s.get(User, 1, **options)
            assert user is not None and user.name == expected
        return time.perf_counter() - start

    database = [await timed_read("user1", execution_options={"cache": False}) for _ in range(7)]
    db_time = statistics.median(database)

    proxy.blackhole()
    before_open: list[float] = []
    while breaker_state(cache) == "closed":
        assert len(before_open) < 10 * THRESHOLD, "the breaker never opened"
        before_open.append(await timed_read("user1"))
    assert len(before_open) <= THRESHOLD, before_open
    assert all(cost < 0.5 for cost in before_open), before_open
    # about one operation timeout each (a failed command, or a failed connection handshake)
    assert statistics.median(before_open) < db_time + 4 * OPERATION_TIMEOUT, before_open
    assert breaker_state(cache) == "open"

    transport_errors = cache.stats()["transport_errors"]
    after_open = [await timed_read("user1") for _ in range(10)]
    start = time.perf_counter()
    await rename(sessions, 1, "alice")
    write_cost = time.perf_counter() - start
    after_open.append(await timed_read("alice"))
    assert cache.stats()["transport_errors"] == transport_errors, "requests still tried Redis"
    assert max(after_open) < 0.5, after_open
    assert write_cost < 0.5, write_cost
    # roughly database time: well under the one operation timeout a Redis attempt would cost
    assert statistics.median(after_open) < db_time + OPERATION_TIMEOUT / 2, (db_time, after_open)
    assert breaker_state(cache) == "open"

    await proxy.restore()
    await wait_until_recovered(cache)
    await assert_cached(sessions, sql, 1, "alice")


# -- F1: logging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_outage", ["mid_run", "at_bind"])
async def test_one_warning_per_outage_and_one_info_per_recovery(
    lab: Lab,
    sessions: Sessions,
    sql: SQLCounter,
    caplog: pytest.LogCaptureFixture,
    first_outage: str,
) -> None:
    caplog.set_level(logging.INFO, logger="sqlacache")
    server = lab.redis()
    proxy = await lab.proxy(server)
    await seed(sessions)
    if first_outage == "at_bind":
        proxy.cut()
    cache = await lab.cache(proxy.url)

    for outage in (1, 2):
        if proxy.mode == "pass":
            await assert_cached(sessions, sql, 1, f"name{outage - 1}" if outage > 1 else "user1")
            proxy.cut()
        for _ in range(20):
            assert await user_name(sessions, 2) == "user2"
        await rename(sessions, 1, f"name{outage}")
        await rename(sessions, 3, f"other{outage}")
        assert await user_name(sessions, 1) == f"name{outage}"
        assert breaker_state(cache) == "open"
        await proxy.restore()
        await wait_until_recovered(cache)

        records = [r for r in caplog.records if r.name.startswith("sqlacache")]
        loud = [f"{r.levelname}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]
        infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
        assert len(loud) == outage, f"after outage {outage}: {loud}"
        assert all(line.startswith("WARNING") for line in loud), loud
        assert len(infos) == outage, f"after outage {outage}: {infos}"


# -- F4: commit() and cancellation ------------------------------------------------------------------


async def test_commit_cancelled_after_COMMIT_still_delivers_its_invalidation(
    lab: Lab, engine: AsyncEngine, sessions: Sessions, sql: SQLCounter
) -> None:
    """The post-commit delivery is slow (not failed) when the task awaiting commit() is cancelled:
    it must run to its end, so the table's versions are bumped and its write lease released."""
    server = lab.redis()
    proxy = await lab.proxy(server)
    cache = await lab.cache(proxy.url, operation_timeout=2.0)
    other_engine, other_sessions, other_sql = await lab.second_engine()
    await lab.cache(server.url, engine=other_engine)
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")
    await assert_cached(other_sessions, other_sql, 1, "user1")

    await commit_cancelled_after_commit(
        cache, sessions, proxy, 1, "carol", lambda: proxy.delay(0.15)
    )
    assert await database_name(engine, 1) == "carol"
    await cache.flush_pending()  # the delivery goes on in a task of its own after the cancel
    stats = cache.stats()
    assert stats["circuit_breaker"]["state"] == "closed", stats["circuit_breaker"]
    assert stats["pending_invalidations"] == 0

    client = aioredis.from_url(server.url)
    try:
        lease = cache.namespace.lease(stats["databases"][0], "users")
        assert await client.exists(lease) == 0, "the write lease of the cancelled commit is held"
    finally:
        await client.aclose()
    await assert_cached(other_sessions, other_sql, 1, "carol")


async def test_commit_cancelled_while_redis_hangs_keeps_the_invalidation_and_redelivers_it(
    lab: Lab, engine: AsyncEngine, sessions: Sessions, sql: SQLCounter
) -> None:
    server = lab.redis()
    proxy = await lab.proxy(server)
    cache = await lab.cache(proxy.url, operation_timeout=0.3)
    other_engine, other_sessions, _ = await lab.second_engine()
    await lab.cache(server.url, engine=other_engine)
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")

    await commit_cancelled_after_commit(cache, sessions, proxy, 1, "dave", proxy.blackhole)
    assert await database_name(engine, 1) == "dave"
    await cache.flush_pending()  # the delivery goes on in a task of its own after the cancel
    stats = cache.stats()
    assert stats["pending_invalidations"] >= 1, "the failed post-commit delivery was not kept"
    assert stats["undelivered_invalidations"] >= 1
    assert stats["circuit_breaker"]["state"] == "open"
    assert await user_name(sessions, 1) == "dave"

    await proxy.restore()
    await wait_until_recovered(cache)
    assert cache.stats()["redelivered_invalidations"] >= 1
    assert await user_name(sessions, 1) == "dave"
    assert await user_name(other_sessions, 1) == "dave"


# -- F3: redelivery before serving ------------------------------------------------------------------


async def test_undelivered_invalidation_is_redelivered_before_the_writer_serves_from_the_cache(
    lab: Lab, sessions: Sessions, sql: SQLCounter
) -> None:
    """A (another OS process) caches a row; B, cut from Redis, updates it. A may serve the old row
    until B can redeliver (F3's documented window); B never serves from the cache meanwhile; after
    B's redelivery A reads fresh."""
    server = lab.redis()
    proxy = await lab.proxy(server)
    await seed(sessions)
    reader = await lab.reader_process(server.url)
    writer = await lab.cache(proxy.url)

    assert await reader.get_user_name(1) == ("user1", 1)
    assert await reader.get_user_name(1) == ("user1", 0)  # cached in Redis

    proxy.cut()
    await rename(sessions, 1, "bob")
    stats = writer.stats()
    assert stats["circuit_breaker"]["state"] == "open"
    assert stats["pending_invalidations"] >= 1
    assert stats["undelivered_invalidations"] >= 1
    await assert_from_database(sessions, sql, 1, "bob")
    # the documented window: nothing told Redis yet, so A's entry still validates
    assert await reader.get_user_name(1) == ("user1", 0)

    await proxy.restore()
    deadline = time.monotonic() + 15
    while breaker_state(writer) == "open" and time.monotonic() < deadline:
        assert await user_name(sessions, 1) == "bob"  # Redis answers, but nothing redelivered yet
    await wait_until_recovered(writer)
    assert writer.stats()["redelivered_invalidations"] >= 1
    assert await reader.get_user_name(1) == ("bob", 1)
    assert await reader.get_user_name(1) == ("bob", 0)
    await assert_cached(sessions, sql, 1, "bob")


async def test_an_invalidation_queued_while_the_queue_is_being_redelivered_is_not_lost(
    lab: Lab, sessions: Sessions, sql: SQLCounter
) -> None:
    """Redis comes back slowly; while the probe's redelivery of the queue is in flight, another
    commit (another table) is queued. It must be delivered too, not dropped with the queue."""
    server = lab.redis()
    proxy = await lab.proxy(server)
    cache = await lab.cache(proxy.url, operation_timeout=2.0)
    await seed(sessions)
    assert await role_name(sessions, 1) == "admin"
    sql.reset()
    assert await role_name(sessions, 1) == "admin"
    assert sql.selects == 0

    proxy.cut()
    await rename(sessions, 1, "alice")  # queued: users
    assert breaker_state(cache) == "open"

    bump_sent = proxy.watch(b"EVALSHA")
    await proxy.restore(latency=0.3)
    await asyncio.wait_for(bump_sent.wait(), 15)  # the probe is redelivering `users`
    async with sessions() as s:
        role = await s.get(Role, 1)
        assert role is not None
        role.name = "root"
        await s.commit()
    assert breaker_state(cache) == "open", "premise: the redelivery was still in flight"

    await wait_until_recovered(cache)
    await proxy.restore()
    assert await role_name(sessions, 1) == "root"
    assert await user_name(sessions, 1) == "alice"
