"""Field findings of issue 9 ("never down"), against real processes: PostgreSQL, private
redis-servers, and the TCP proxy of faultkit.py.

Each test names the item it pins down. Hits are proven by counting SQL statements; the only timing
assertion is a generous one (no request may cost ten operation timeouts while Redis is silent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sqlacache
from integration import test_faults as faults
from integration.faultkit import LOOPBACK, FaultProxy, ReaderProcess, RedisServer, free_port
from integration.test_faults import (
    Lab,
    assert_cached,
    breaker_state,
    rename,
    seed,
    wait_until_recovered,
)
from tests.fixtures import SQLCounter, reset_schema
from tests.models import User

stack = faults.stack
lab = faults.lab

#: generous: a loaded two-CPU machine must not turn scheduling delays into failures
TIMEOUT = 0.1
#: a request that waits this long was not bounded by the timeout
TOO_SLOW = 10 * TIMEOUT
#: a request still running after this is hung (reported, not waited for forever)
HUNG = 15.0
PASSWORD = "s3cret-pass"

# The handshake redis-py runs on every new connection, by what the URL asks for.
HANDSHAKES = {
    "SELECT": {"db": 3},
    "AUTH": {"password": PASSWORD},
    "HELLO": {"query": "?protocol=3"},
}


def redis_url(port: int, *, db: int = 0, password: str | None = None, query: str = "") -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}{LOOPBACK}:{port}/{db}{query}"


def server_args(handshake: str) -> list[str]:
    return ["--requirepass", PASSWORD] if handshake == "AUTH" else []


async def start_redis(lab: Lab, args: list[str]) -> RedisServer:
    server = RedisServer(args=args)
    lab.servers.append(server)
    server.start()
    return server


async def timed(work: Callable[[], Any]) -> float:
    """How long `work()` (awaitable) took; HUNG if it had not finished by then."""
    start = time.perf_counter()
    try:
        await asyncio.wait_for(work(), HUNG)
    except asyncio.TimeoutError:
        return HUNG
    return time.perf_counter() - start


# -- item 9: a blackholed Redis ---------------------------------------------------------------------


async def blackholed_requests(
    cache: Any, proxy: FaultProxy, read: Callable[[], Any], requests: int = 12
) -> list[float]:
    """Blackhole the proxy (open connections dropped, new ones accepted and silent), then run
    `requests` sequential reads; return what each cost."""
    proxy.blackhole(drop_existing=True)
    costs: list[float] = []
    for _ in range(requests):
        cost = await timed(read)
        costs.append(cost)
        if cost >= HUNG:
            break  # hung: the rest would hang too
    return costs


@pytest.mark.parametrize("handshake", sorted(HANDSHAKES))
async def test_item9_blackholed_redis_bounds_every_async_request_and_opens_the_breaker(
    lab: Lab, sessions: Any, sql: SQLCounter, handshake: str
) -> None:
    """Item 9 (async client): with Redis blackholed after the process connected, each request
    costs at most about the timeout until the breaker opens, whatever the connection handshake
    (SELECT for a db number, AUTH for a password, HELLO for RESP3); the application sees no error;
    once Redis answers again the cache serves hits."""
    server = await start_redis(lab, server_args(handshake))
    proxy = await lab.proxy(server)
    cache = await lab.cache(
        redis_url(proxy.port, **HANDSHAKES[handshake]), operation_timeout=TIMEOUT
    )
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")

    async def read() -> None:
        assert await faults.user_name(sessions, 1) == "user1"

    costs = await blackholed_requests(cache, proxy, read)
    slow = [round(c, 3) for c in costs if c > TOO_SLOW]
    assert not slow, f"requests not bounded by the timeout ({TIMEOUT}s): {slow} of {costs}"
    assert breaker_state(cache) == "open", cache.stats()["circuit_breaker"]

    await proxy.restore()
    await wait_until_recovered(cache)
    await assert_cached(sessions, sql, 1, "user1")


@pytest.fixture
def sync_engine() -> Any:
    engine = create_engine(faults.PG_URL.replace("+asyncpg", "+psycopg"))
    yield engine
    engine.dispose()


@pytest.mark.parametrize("handshake", sorted(HANDSHAKES))
async def test_item9_blackholed_redis_bounds_every_sync_request_and_opens_the_breaker(
    lab: Lab, sessions: Any, sync_engine: Engine, handshake: str
) -> None:
    """Item 9 (sync client): the same bound for a sync `Session` (run in a thread, so that the
    proxy in this event loop keeps running)."""
    server = await start_redis(lab, server_args(handshake))
    proxy = await lab.proxy(server)
    await seed(sessions)
    cache = await lab.cache(
        redis_url(proxy.port, **HANDSHAKES[handshake]), operation_timeout=TIMEOUT
    )
    cache.bind_sync(sync_engine)
    sync_sessions = sessionmaker(sync_engine, expire_on_commit=False)
    sql = SQLCounter()
    event.listen(sync_engine, "before_cursor_execute", sql)

    def read_sync() -> str | None:
        with sync_sessions() as s:
            user = s.get(User, 1)
            return None if user is None else user.name

    async def read() -> None:
        assert await asyncio.to_thread(read_sync) == "user1"

    async def assert_sync_hit() -> None:
        await read()
        sql.reset()
        await read()
        assert sql.selects == 0, f"expected a cache hit, the database saw {sql.statements}"

    await assert_sync_hit()
    costs = await blackholed_requests(cache, proxy, read)
    slow = [round(c, 3) for c in costs if c > TOO_SLOW]
    assert not slow, f"requests not bounded by the timeout ({TIMEOUT}s): {slow} of {costs}"
    assert breaker_state(cache) == "open", cache.stats()["circuit_breaker"]

    await proxy.restore()
    deadline = time.monotonic() + 15
    while True:  # no event loop probes for a sync caller: its requests probe inline
        await read()
        if breaker_state(cache) == "closed" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await wait_until_recovered(cache)
    await assert_sync_hit()


# -- item 10: several event loops -------------------------------------------------------------------


class LoopsLab:
    """A cache bound once, used from event loops that come and go; its own redis-server."""

    def __init__(self, tmp_path: Path, proxy_port: int | None = None) -> None:
        self.tmp_path = tmp_path
        self.server = RedisServer()
        self.server.start()
        #: the cache talks to Redis through a proxy on this port, if given (one per loop)
        self.proxy_port = proxy_port
        self.prefix = f"loops{uuid.uuid4().hex[:8]}"
        # NullPool: the engine's own connections must not outlive a loop either
        self.engine = create_async_engine(faults.PG_URL, poolclass=NullPool)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.selects: dict[int, int] = {}  # per thread: SELECTs its loop sent
        event.listen(self.engine.sync_engine, "before_cursor_execute", self._count)
        self.cache = sqlacache.configure(
            backend=redis_url(proxy_port) if proxy_port else self.server.url,
            models={"*": {"timeout": 300}},
            prefix=self.prefix,
            operation_timeout=0.5,
            breaker_probe_interval=0.1,
        )

    def _count(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            ident = threading.get_ident()
            self.selects[ident] = self.selects.get(ident, 0) + 1

    def selects_here(self) -> int:
        return self.selects.get(threading.get_ident(), 0)

    async def setup(self, users: int = 3) -> None:
        await reset_schema(self.engine)
        await seed(self.sessions, users)
        await self.cache.bind(self.engine)

    async def reader(self, name: str) -> ReaderProcess:
        return await ReaderProcess.start(
            pg_url=faults.PG_URL,
            redis_url=self.server.url,
            prefix=self.prefix,
            stderr_path=self.tmp_path / f"{name}.stderr",
        )

    async def assert_hit(self, pk: int, expected: str) -> None:
        assert await faults.user_name(self.sessions, pk) == expected
        before = self.selects_here()
        assert await faults.user_name(self.sessions, pk) == expected
        assert self.selects_here() == before, f"user {pk}: expected a cache hit"

    def close(self) -> None:
        async def teardown() -> None:
            await self.cache.disconnect()
            await self.engine.dispose()

        try:
            asyncio.run(teardown())
        finally:
            self.server.cleanup()


@pytest.fixture
def loops_lab(stack: Any, tmp_path: Path) -> Iterator[LoopsLab]:
    lab = LoopsLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def assert_recovered(cache: sqlacache.CacheManager, *, errors: bool = True) -> None:
    """Breaker closed, nothing left to redeliver; with `errors=False`, no Redis call ever failed
    (no fault was injected: an error can only be the cache misusing a loop's connection)."""
    stats = cache.stats()
    assert stats["circuit_breaker"]["state"] == "closed", stats["circuit_breaker"]
    assert stats["pending_invalidations"] == 0, stats
    if not errors:
        assert stats["transport_errors"] == 0, stats["circuit_breaker"]


def test_item10_a_second_asyncio_run_serves_hits_and_its_commits_invalidate(
    loops_lab: LoopsLab,
) -> None:
    """Item 10: the cache is bound in one `asyncio.run()`; in the next one (a new event loop) it
    serves hits, and its commits invalidate what another process cached; the breaker stays
    closed."""
    lab = loops_lab

    async def second() -> None:
        for pk in (1, 2, 3):
            await lab.assert_hit(pk, f"user{pk}")  # stored by the first loop, or now
        reader = await lab.reader("reader")
        try:
            assert await reader.get_user_name(1) == ("user1", 0)  # cached in Redis
            await rename(lab.sessions, 1, "alice")
            await lab.cache.flush_pending()
            assert await reader.get_user_name(1) == ("alice", 1), "the commit did not invalidate"
        finally:
            await reader.stop()
        await lab.assert_hit(1, "alice")
        assert_recovered(lab.cache, errors=False)

    async def first() -> None:
        await lab.setup()
        for pk in (1, 2, 3):
            await lab.assert_hit(pk, f"user{pk}")

    asyncio.run(first())
    asyncio.run(second())
    asyncio.run(second_again(lab))
    assert_recovered(lab.cache, errors=False)


async def second_again(lab: LoopsLab) -> None:
    """A third loop: a commit, then a hit of the new value."""
    await rename(lab.sessions, 1, "bob")
    await lab.assert_hit(1, "bob")
    await lab.cache.flush_pending()
    assert_recovered(lab.cache, errors=False)


def test_item10_two_threads_each_with_its_own_loop_use_one_cache_at_once(
    loops_lab: LoopsLab,
) -> None:
    """Item 10: two threads, each running its own event loop at the same time, read (hits) and
    commit through one cache; every commit invalidates (a read after it sees it, here and in
    another process), and the breaker is closed at the end."""
    lab = loops_lab
    asyncio.run(lab.setup(users=2))
    rounds = 5
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    async def work(pk: int) -> None:
        start.wait()
        for round_ in range(rounds):
            await lab.assert_hit(pk, f"user{pk}" if round_ == 0 else f"u{pk}r{round_ - 1}")
            await rename(lab.sessions, pk, f"u{pk}r{round_}")
            assert await faults.user_name(lab.sessions, pk) == f"u{pk}r{round_}"
            await asyncio.sleep(0)
        await lab.cache.flush_pending()

    def thread(pk: int) -> None:
        try:
            asyncio.run(work(pk))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(pk,)) for pk in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread's loop hung"
    assert not errors, errors

    async def check() -> None:
        reader = await lab.reader("reader")
        try:
            for pk in (1, 2):
                assert (await reader.get_user_name(pk))[0] == f"u{pk}r{rounds - 1}"
        finally:
            await reader.stop()
        for pk in (1, 2):
            await lab.assert_hit(pk, f"u{pk}r{rounds - 1}")
        assert_recovered(lab.cache, errors=False)

    asyncio.run(check())
    assert_recovered(lab.cache, errors=False)


def test_item10_a_loop_closed_while_the_breaker_probes_leaves_no_probe_behind(
    loops_lab: LoopsLab,
) -> None:
    """Item 10: the breaker opens in a loop that is then closed without cancelling its tasks (a
    hand-managed loop), its probe still pending. Once Redis is back, a request in a new loop
    must close the breaker and be served from the cache again."""
    lab = loops_lab
    loop = asyncio.new_event_loop()

    async def outage() -> None:
        await lab.setup()
        await lab.assert_hit(1, "user1")
        lab.server.kill()
        for _ in range(10):
            assert await faults.user_name(lab.sessions, 1) == "user1"
        assert breaker_state(lab.cache) == "open"

    try:
        loop.run_until_complete(outage())
    finally:
        loop.close()  # the probe task is left pending on a closed loop
    lab.server.start()

    async def after() -> None:
        deadline = time.monotonic() + 15
        while breaker_state(lab.cache) == "open" and time.monotonic() < deadline:
            assert await faults.user_name(lab.sessions, 1) == "user1"
            await asyncio.sleep(0.05)
        assert_recovered(lab.cache)
        await lab.assert_hit(1, "user1")

    asyncio.run(after())


# -- item 12: an answer that says the configuration is wrong -----------------------------------------


async def raw_client(server: RedisServer, password: str | None = None) -> Any:
    """One dedicated connection (it stays authenticated when the server's password changes)."""
    client = aioredis.Redis(
        host=LOOPBACK, port=server.port, password=password, single_connection_client=True
    )
    lab_clients.append(client)
    await client.ping()
    return client


lab_clients: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> Any:
    yield
    while lab_clients:
        await lab_clients.pop().aclose()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("sqlacache") and r.levelno >= logging.ERROR
    ]


async def test_item12_a_wrong_password_raises_config_error_at_bind_naming_the_password(
    lab: Lab,
) -> None:
    """Item 12: Redis answers WRONGPASS at bind(): ConfigError naming the password."""
    server = await start_redis(lab, ["--requirepass", PASSWORD])
    with pytest.raises(sqlacache.ConfigError, match="password"):
        await lab.cache(redis_url(server.port, password="not-the-password"))
    assert lab.caches[-1].stats()["databases"] == [], "the engine stayed bound"


async def test_item12_a_missing_password_raises_config_error_at_bind_naming_the_password(
    lab: Lab,
) -> None:
    """Item 12: Redis answers NOAUTH at bind() (the URL has no password): ConfigError."""
    server = await start_redis(lab, ["--requirepass", PASSWORD])
    with pytest.raises(sqlacache.ConfigError, match="requires a password"):
        await lab.cache(redis_url(server.port))


async def test_item12_a_database_number_out_of_range_raises_config_error_at_bind_naming_it(
    lab: Lab,
) -> None:
    """Item 12: SELECT 99 on a Redis with 16 databases: ConfigError naming the db number."""
    server = await start_redis(lab, [])
    with pytest.raises(sqlacache.ConfigError, match="database number 99"):
        await lab.cache(redis_url(server.port, db=99))


async def test_item12_an_acl_denial_at_bind_raises_config_error_naming_the_acl_user(
    lab: Lab,
) -> None:
    """Item 12: an ACL user that may not run INFO (bind asks the server's identity)."""
    server = await start_redis(lab, [])
    admin = await raw_client(server)
    await admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-info")
    url = f"redis://limited:pw@{LOOPBACK}:{server.port}/0"
    with pytest.raises(sqlacache.ConfigError, match="ACL user 'limited'"):
        await lab.cache(url)


async def test_item12_an_unreachable_redis_at_bind_stays_an_outage(lab: Lab, sessions: Any) -> None:
    """Item 12 / F1: nothing listens: no exception at bind, reads served by the database, an
    outage in the breaker and no config error."""
    server = lab.redis(start=False)
    cache = await lab.cache(server.url)
    await seed(sessions)
    for _ in range(5):
        assert await faults.user_name(sessions, 1) == "user1"
    assert breaker_state(cache) == "open"
    assert cache.stats()["backend"]["config_error"] is None


async def test_item12_an_acl_denial_that_first_appears_later_is_an_error_in_the_log_and_stats(
    lab: Lab, sessions: Any, sql: SQLCounter, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 12: the ACL user may connect but not run scripts: bind() succeeds, the first fill is
    refused. The application sees no error; the log has an ERROR naming the ACL user, stats()
    shows it; once the ACL is fixed the cache resumes and the error is gone."""
    caplog.set_level(logging.INFO, logger="sqlacache")
    server = await start_redis(lab, [])
    admin = await raw_client(server)
    await admin.execute_command(
        "ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-evalsha", "-eval"
    )
    cache = await lab.cache(f"redis://limited:pw@{LOOPBACK}:{server.port}/0")
    await seed(sessions)

    for _ in range(5):
        assert await faults.user_name(sessions, 1) == "user1"
        await cache.flush_pending()
    problem = cache.stats()["backend"]["config_error"]
    assert problem is not None and "ACL user 'limited'" in problem, cache.stats()["backend"]
    logged = errors_logged(caplog)
    assert len(logged) == 1 and "ACL user 'limited'" in logged[0], logged

    await admin.execute_command("ACL", "SETUSER", "limited", "+evalsha", "+eval")
    await wait_until_recovered(cache)
    assert cache.stats()["backend"]["config_error"] is None
    await assert_cached(sessions, sql, 1, "user1")
    assert len(errors_logged(caplog)) == 1


async def test_item12_a_password_required_later_is_an_error_in_the_log_and_stats(
    lab: Lab, sessions: Any, sql: SQLCounter, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 12: Redis starts requiring a password while the process runs (its connections
    killed): reads and commits go on; an ERROR names the password; stats() shows it."""
    caplog.set_level(logging.INFO, logger="sqlacache")
    server = await start_redis(lab, [])
    admin = await raw_client(server)
    cache = await lab.cache(server.url)
    await seed(sessions)
    await assert_cached(sessions, sql, 1, "user1")

    await admin.config_set("requirepass", PASSWORD)
    await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
    for _ in range(5):
        assert await faults.user_name(sessions, 1) == "user1"
    await rename(sessions, 2, "bob")
    assert await faults.user_name(sessions, 2) == "bob"
    problem = cache.stats()["backend"]["config_error"]
    assert problem is not None and "password" in problem, cache.stats()["backend"]
    logged = errors_logged(caplog)
    assert len(logged) == 1 and "password" in logged[0], logged

    await admin.config_set("requirepass", "")
    await wait_until_recovered(cache)
    assert cache.stats()["backend"]["config_error"] is None
    await assert_cached(sessions, sql, 2, "bob")


def test_item10_a_delivery_cut_by_the_end_of_its_loop_is_redelivered_by_the_next_loop(
    stack: Any, tmp_path: Path
) -> None:
    """Item 10: a commit cancelled after COMMIT hands its invalidation to a task of its own; the
    loop ends (asyncio.run() returns) while it is in flight, cancelling it. The invalidation must
    be kept and redelivered by the next loop: another process reads the new row, and the commit's
    write lease is released, so that the table is cached again."""
    port = free_port()
    lab = LoopsLab(tmp_path, proxy_port=port)
    try:

        async def first() -> None:
            proxy = await FaultProxy(lab.server.port, port=port).start()
            await lab.setup()
            await lab.assert_hit(1, "user1")
            reader = await lab.reader("reader1")
            try:
                assert await reader.get_user_name(1) == ("user1", 0)
            finally:
                await reader.stop()
            await faults.commit_cancelled_after_commit(
                lab.cache, lab.sessions, proxy, 1, "carol", lambda: proxy.delay(1.0)
            )
            proxy.stop_listening()  # the next loop listens on the same port
            # return at once: the delivery is still in flight, and asyncio.run() cancels it

        async def second() -> None:
            proxy = await FaultProxy(lab.server.port, port=port).start()
            try:
                await lab.cache.flush_pending()
                deadline = time.monotonic() + 15
                while cache_recovering(lab.cache) and time.monotonic() < deadline:
                    assert await faults.user_name(lab.sessions, 1) == "carol"
                    await asyncio.sleep(0.05)
                assert_recovered(lab.cache)
                reader = await lab.reader("reader2")
                try:
                    assert await reader.get_user_name(1) == ("carol", 1), "stale in another process"
                    # the lost delivery also released the commit's write lease: fills resume
                    assert await reader.get_user_name(1) == ("carol", 0), "users never cached again"
                finally:
                    await reader.stop()
                await lab.assert_hit(1, "carol")
            finally:
                await proxy.aclose()

        asyncio.run(first())
        asyncio.run(second())
    finally:
        lab.close()


def cache_recovering(cache: sqlacache.CacheManager) -> bool:
    stats = cache.stats()
    return stats["circuit_breaker"]["state"] != "closed" or stats["pending_invalidations"] > 0


def test_item12_a_wrong_password_raises_config_error_at_bind_sync(
    stack: Any, sync_engine: Engine
) -> None:
    """Item 12 (sync client): `bind_sync()` raises the same ConfigError."""
    with contextlib.ExitStack() as cleanup:
        server = RedisServer(args=["--requirepass", PASSWORD])
        cleanup.callback(server.cleanup)
        server.start()
        cache = sqlacache.configure(
            backend=redis_url(server.port, password="not-the-password"),
            models={"*": {"timeout": 300}},
            operation_timeout=TIMEOUT,
        )
        cleanup.callback(cache.disconnect_sync)
        with pytest.raises(sqlacache.ConfigError, match="password"):
            cache.bind_sync(sync_engine)
        assert cache.stats()["databases"] == []


async def test_item9_bind_to_a_blackholed_redis_is_bounded_and_raises_nothing(
    lab: Lab, sessions: Any
) -> None:
    """Item 9: bind() itself (warm-up, server identity, registry) against a Redis that accepts
    connections and never answers costs a bounded time, and the reads that follow are served
    by the database."""
    server = await start_redis(lab, [])
    proxy = await lab.proxy(server)
    proxy.blackhole(drop_existing=True)
    start = time.perf_counter()
    cache = await asyncio.wait_for(
        lab.cache(redis_url(proxy.port, db=3), operation_timeout=TIMEOUT), HUNG
    )
    cost = time.perf_counter() - start
    assert cost < 2 * TOO_SLOW, f"bind() took {cost:.3f}s against a silent Redis"
    await seed(sessions)

    async def read() -> None:
        assert await faults.user_name(sessions, 1) == "user1"

    costs = await blackholed_requests(cache, proxy, read, requests=6)
    assert not [c for c in costs if c > TOO_SLOW], costs
