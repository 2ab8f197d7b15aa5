"""Field findings of issue 9 ("never down"), against real processes: PostgreSQL, private
redis-servers, and the TCP proxy of faultkit.py.

Each test names the item it pins down. Hits are proven by counting SQL statements; the only timing
assertion is a generous one (no request may cost ten operation timeouts while Redis is silent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from integration import test_faults as faults
from integration.faultkit import LOOPBACK, FaultProxy, RedisServer
from integration.test_faults import Lab, assert_cached, breaker_state, seed, wait_until_recovered
from tests.fixtures import SQLCounter
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

