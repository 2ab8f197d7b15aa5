"""The cache on a local Redis Cluster (3 masters, 3 replicas): reads, invalidation, failover,
slot migration, and the configuration mistakes (a cluster URL on a plain server, the reverse).

Traffic tests run readers and a writer at once while the fault happens: every read is checked
against the commits that had returned before it started (a read must never return a name older
than that), no exception may reach the application, and each read must finish within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import sqlacache
from integration.clusterkit import LocalCluster
from integration.conftest import PG_URL, REDIS_URL, services_problems
from integration.faultkit import ReaderProcess
from sqlacache.backends.cluster import ClusterStore, check_config
from sqlacache.backends.redis import RedisStore
from sqlacache.config import parse_backend
from sqlacache.errors import ConfigError
from sqlacache.keys import Namespace
from tests.fixtures import Stack
from tests.models import User
from tests.test_race import (  # noqa: F401 - the announcement's rule, on the cluster
    test_a_reader_that_sees_a_commit_in_the_database_never_gets_the_older_row_cached,
    user,
)

#: No single read may take longer than this during a fault (each backend call is bounded by the
#: operation timeout; the rest is the database and the event loop of a busy 2-CPU machine).
READ_BOUND_SECONDS = 2.0


@pytest.fixture
def stack(redis_cluster: LocalCluster) -> Stack:
    problems = [p for p in services_problems() if p.startswith("PostgreSQL")]
    if problems:
        message = "integration services unreachable: " + "; ".join(problems)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(message)
    return Stack(name="redis-cluster", db_url=PG_URL, backend=redis_cluster.url)


async def seed(sessions: Any, n: int = 10) -> None:
    async with sessions() as s:
        s.add_all([User(id=i, name=f"{i}:0") for i in range(1, n + 1)])
        await s.commit()


async def get_name(sessions: Any, pk: int) -> str | None:
    async with sessions() as s:
        user = await s.get(User, pk)
        return None if user is None else user.name


@pytest.fixture
def plain_redis() -> str:
    """The URL of the plain (non-cluster) Redis of the integration tests."""
    problems = [p for p in services_problems() if p.startswith("Redis")]
    if problems:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("; ".join(problems) + " (CI=true: failing instead of skipping)")
        pytest.skip("; ".join(problems))
    return REDIS_URL


def meta_slot(cache: sqlacache.CacheManager, cluster: LocalCluster) -> int:
    return cluster.keyslot(Namespace(cache.config.prefix).epoch_key)


# -- reads and invalidation -------------------------------------------------------------------


async def test_get_hit_on_the_cluster_issues_no_sql(make_cache, sessions, sql) -> None:
    cache = await make_cache()
    assert isinstance(cache._bound.runtime.store.raw, ClusterStore)
    await seed(sessions, 3)
    assert await get_name(sessions, 1) == "1:0"
    await cache.flush_pending()
    sql.reset()
    assert await get_name(sessions, 1) == "1:0"
    assert sql.statements == []


async def test_a_hit_is_one_round_trip_to_at_most_two_nodes(make_cache, sessions, sql) -> None:
    cache = await make_cache()
    await seed(sessions, 3)
    await get_name(sessions, 2)
    await cache.flush_pending()
    store = cache._bound.runtime.store.raw
    assert isinstance(store, ClusterStore)
    rounds: list[int] = []
    original = store._round

    async def counting(groups: Any, *args: Any) -> Any:
        rounds.append(len({address for (address, _), _ in groups}))
        return await original(groups, *args)

    store._round = counting  # type: ignore[method-assign]
    sql.reset()
    assert await get_name(sessions, 2) == "2:0"
    assert sql.statements == []
    assert len(rounds) == 1 and rounds[0] <= 2, rounds


async def test_a_hit_takes_one_connection_per_node_it_reaches(make_cache, sessions, sql) -> None:
    """An entry on the meta slot's node is read with the versions in one write on one
    connection, as on a single Redis; an entry elsewhere adds one connection to its node."""
    cache = await make_cache()
    await seed(sessions, 30)
    for pk in range(1, 31):
        await get_name(sessions, pk)
    await cache.flush_pending()
    store = cache._bound.runtime.store.raw
    taken: list[Any] = []
    original = store._connection

    async def counting(address: Any) -> Any:
        taken.append(address)
        return await original(address)

    store._connection = counting  # type: ignore[method-assign]
    per_hit = []
    sql.reset()
    for pk in range(1, 31):
        taken.clear()
        assert await get_name(sessions, pk) == f"{pk}:0"
        per_hit.append(list(taken))
    assert sql.statements == []
    assert all(len(nodes) == len(set(nodes)) for nodes in per_hit), per_hit
    # 30 entries over 3 masters: some live on the meta slot's node (one connection for the hit)
    assert any(len(nodes) == 1 for nodes in per_hit), per_hit
    assert any(len(nodes) == 2 for nodes in per_hit), per_hit


async def test_fetch_hit_and_commit_invalidates_on_the_cluster(make_cache, sessions, sql) -> None:
    cache = await make_cache()
    await seed(sessions, 5)
    stmt = select(User).where(User.id <= 3).order_by(User.id)

    async def names() -> list[str]:
        async with sessions() as s:
            return [u.name for u in (await s.execute(stmt)).scalars()]

    assert await names() == ["1:0", "2:0", "3:0"]
    await cache.flush_pending()
    sql.reset()
    assert await names() == ["1:0", "2:0", "3:0"]
    assert sql.selects == 0
    async with sessions() as s:
        (await s.get(User, 2)).name = "2:1"
        await s.commit()
    assert await names() == ["1:0", "2:1", "3:0"]
    async with sessions() as s:
        s.add(User(id=0, name="0:0"))  # a row entering the result
        await s.commit()
    assert await names() == ["0:0", "1:0", "2:1", "3:0"]


async def test_entries_are_spread_over_the_masters(make_cache, sessions, redis_cluster) -> None:
    cache = await make_cache()
    await seed(sessions, 30)
    for pk in range(1, 31):
        await get_name(sessions, pk)
    await cache.flush_pending()
    holders = set()
    for port in redis_cluster.masters():
        keys = redis_cluster.node_cli(
            port, "--scan", "--pattern", f"{cache.config.prefix}:e:*"
        ).split()
        if keys:
            holders.add(port)
    assert len(holders) >= 2, "entries should be spread by their digest, not share one slot"


async def test_another_process_on_the_cluster_sees_the_invalidation(
    make_cache, sessions, stack, tmp_path: Path
) -> None:
    cache = await make_cache()
    await seed(sessions, 3)
    reader = await ReaderProcess.start(
        pg_url=stack.db_url,
        redis_url=stack.backend,
        prefix=cache.config.prefix,
        stderr_path=tmp_path / "reader.err",
    )
    try:
        assert await reader.get_user_name(1) == ("1:0", 1)
        await asyncio.sleep(0.2)  # its fill lands in the background
        assert await reader.get_user_name(1) == ("1:0", 0), "the other process hits"
        async with sessions() as s:
            (await s.get(User, 1)).name = "1:1"
            await s.commit()
        assert await reader.get_user_name(1) == ("1:1", 1)
    finally:
        await reader.stop()


async def test_invalidate_all_on_the_cluster_clears_every_master(make_cache, sessions, sql) -> None:
    cache = await make_cache()
    await seed(sessions, 20)
    for pk in range(1, 21):
        await get_name(sessions, pk)
    await cache.flush_pending()
    assert (await cache.namespace_stats())["entries"] == 20
    await cache.invalidate_all()
    assert (await cache.namespace_stats())["entries"] == 0
    sql.reset()
    assert await get_name(sessions, 7) == "7:0"
    assert sql.selects == 1


async def test_sync_sessions_on_the_cluster_hit_and_invalidate(stack, engine) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    sync_engine = create_engine(PG_URL.replace("+asyncpg", "+psycopg"))
    cache = sqlacache.configure(backend=stack.backend, models={"*": {"timeout": 300}}, prefix="sy")
    try:
        cache.bind_sync(sync_engine)
        with Session(sync_engine) as s:
            s.add(User(id=1, name="1:0"))
            s.commit()
        for expected in ("1:0", "1:0"):
            with Session(sync_engine) as s:
                assert s.get(User, 1).name == expected
        with Session(sync_engine) as s:
            s.get(User, 1).name = "1:1"
            s.commit()
        with Session(sync_engine) as s:
            assert s.get(User, 1).name == "1:1"
        assert cache.stats()["circuit_breaker"]["state"] == "closed"
    finally:
        cache.invalidate_all_sync()
        cache.disconnect_sync()
        sync_engine.dispose()


# -- configuration mistakes -------------------------------------------------------------------


async def test_a_cluster_url_on_a_plain_redis_is_a_config_error(plain_redis: str) -> None:
    host_port = plain_redis.split("://", 1)[1].split("/", 1)[0]
    store = ClusterStore(parse_backend(f"redis://{host_port}?cluster=true"), 1.0)
    try:
        with pytest.raises(ConfigError, match="not a cluster node"):
            check_config(store)
    finally:
        await store.aclose()


async def test_a_plain_url_on_a_cluster_node_is_a_config_error(redis_cluster) -> None:
    store = RedisStore(parse_backend(f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"), 1.0)
    try:
        with pytest.raises(ConfigError, match=r"cluster mode enabled, use '\?cluster=true'"):
            check_config(store)
    finally:
        await store.aclose()


async def test_the_cluster_mode_checks_also_run_inside_a_bind(
    redis_cluster: LocalCluster, plain_redis: str
) -> None:
    """bind() runs in SQLAlchemy's greenlet, on the asyncio clients: the same answers there."""
    from sqlacache._greenlet import greenlet_spawn

    right = ClusterStore(parse_backend(redis_cluster.url), 1.0)
    plain = RedisStore(parse_backend(f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"), 1.0)
    try:
        await greenlet_spawn(check_config, right)  # a cluster URL on a cluster: fine
        with pytest.raises(ConfigError, match="cluster mode enabled"):
            await greenlet_spawn(check_config, plain)
    finally:
        await right.aclose()
        await plain.aclose()
    host_port = plain_redis.split("://", 1)[1].split("/", 1)[0]
    store = ClusterStore(parse_backend(f"redis://{host_port}?cluster=true"), 1.0)
    try:
        with pytest.raises(ConfigError, match="not a cluster node"):
            await greenlet_spawn(check_config, store)
    finally:
        await store.aclose()


async def test_matching_cluster_modes_pass_the_check(
    redis_cluster: LocalCluster, plain_redis: str
) -> None:
    store = ClusterStore(parse_backend(redis_cluster.url), 1.0)
    plain = RedisStore(parse_backend(plain_redis), 1.0)
    try:
        check_config(store)
        check_config(plain)
    finally:
        await store.aclose()
        await plain.aclose()


async def test_an_unreachable_cluster_is_an_outage_not_a_config_error() -> None:
    from integration.faultkit import free_port

    store = ClusterStore(parse_backend(f"redis://127.0.0.1:{free_port()}?cluster=true"), 0.2)
    try:
        check_config(store)  # nothing answers: the breaker deals with it, bind() does not raise
    finally:
        await store.aclose()


# -- faults during traffic ------------------------------------------------------------------


@dataclass
class Traffic:
    """Readers and a writer on users 1..n; every read checked against returned commits."""

    sessions: Any
    n: int = 10
    committed: dict[int, int] = field(default_factory=dict)
    reads: int = 0
    writes: int = 0
    stale: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    slowest: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            pk = seq % self.n + 1
            try:
                async with self.sessions() as s:
                    (await s.get(User, pk)).name = f"{pk}:{seq}"
                    await s.commit()
            except Exception as exc:
                self.errors.append(f"write: {type(exc).__name__}: {exc}")
                continue
            self.committed[pk] = seq
            self.writes += 1
            await asyncio.sleep(0.005)

    async def reader(self, which: int) -> None:
        turn = 0
        while not self._stop.is_set():
            turn += 1
            floor = dict(self.committed)
            started = time.monotonic()
            try:
                if turn % 3:
                    pk = (turn * 7 + which) % self.n + 1
                    async with self.sessions() as s:
                        names = [(await s.get(User, pk)).name]
                else:
                    async with self.sessions() as s:
                        stmt = select(User).order_by(User.id)
                        names = [u.name for u in (await s.execute(stmt)).scalars()]
                        await s.scalar(select(func.count()).select_from(User))
            except Exception as exc:
                self.errors.append(f"read: {type(exc).__name__}: {exc}")
                continue
            self.slowest = max(self.slowest, time.monotonic() - started)
            for name in names:
                pk_text, seq_text = name.split(":")
                if int(seq_text) < floor.get(int(pk_text), 0):
                    self.stale.append(f"{name} read after {pk_text}:{floor[int(pk_text)]}")
            self.reads += 1
            await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def running(self, readers: int = 3) -> AsyncIterator[Traffic]:
        tasks = [asyncio.ensure_future(self.writer())]
        tasks += [asyncio.ensure_future(self.reader(i)) for i in range(readers)]
        try:
            await asyncio.sleep(0.5)  # warm: entries exist before the fault
            yield self
            await asyncio.sleep(0.5)  # and traffic goes on after it
        finally:
            self._stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    def check(self, cache: sqlacache.CacheManager | None = None) -> None:
        stats = cache.stats() if cache is not None else {}
        print(
            f"\ncluster traffic: reads={self.reads} writes={self.writes} stale={len(self.stale)}"
            f" errors={len(self.errors)} slowest={self.slowest:.3f}s"
            f" totals={stats.get('totals')} transport_errors={stats.get('transport_errors')}"
            f" undelivered={stats.get('undelivered_invalidations')}"
            f" epoch_moves={stats.get('epoch_moves')}"
        )
        assert self.errors == [], self.errors[:5]
        assert self.stale == [], self.stale[:5]
        assert self.reads > 20 and self.writes > 5, (self.reads, self.writes)
        assert self.slowest < READ_BOUND_SECONDS, self.slowest


async def recovers(cache: sqlacache.CacheManager, sessions: Any, sql: Any) -> None:
    """The cache serves hits again (not merely the database) once the cluster is whole."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        await cache.flush_pending()
        await get_name(sessions, 1)
        await cache.flush_pending()
        sql.reset()
        await get_name(sessions, 1)
        if sql.selects == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no hits after the fault: {cache.stats()['circuit_breaker']}")


async def test_meta_master_failover_during_traffic_serves_nothing_stale(
    make_cache, sessions, sql, redis_cluster
) -> None:
    cache = await make_cache()
    await seed(sessions)
    traffic = Traffic(sessions)
    master = redis_cluster.master_of_slot(meta_slot(cache, redis_cluster))
    async with traffic.running():
        await asyncio.to_thread(redis_cluster.failover, master)
    traffic.check(cache)
    await recovers(cache, sessions, sql)


async def test_a_killed_meta_master_during_traffic_serves_nothing_stale(
    make_cache, sessions, sql, redis_cluster
) -> None:
    cache = await make_cache()
    await seed(sessions)
    traffic = Traffic(sessions)
    meta_master = redis_cluster.master_of_slot(meta_slot(cache, redis_cluster))
    from sqlacache._greenlet import greenlet_spawn

    identity = await greenlet_spawn(cache._bound.runtime.store.raw.server_id)
    try:
        async with traffic.running():
            await asyncio.to_thread(redis_cluster.kill_master, meta_master)
    finally:  # back as a replica: the cluster stays 3 + 3
        await asyncio.to_thread(redis_cluster.restart_node, meta_master)
    traffic.check(cache)
    await recovers(cache, sessions, sql)
    # the manager moves the namespace to a new epoch when the identity changes
    assert await greenlet_spawn(cache._bound.runtime.store.raw.server_id) not in (None, identity)


async def test_meta_slot_and_entry_slot_migrations_during_traffic_serve_nothing_stale(
    make_cache, sessions, sql, redis_cluster
) -> None:
    cache = await make_cache()
    await seed(sessions)
    for pk in range(1, 11):
        await get_name(sessions, pk)
    await cache.flush_pending()
    entry_key = next(iter(await _entry_keys(redis_cluster, cache.config.prefix)))
    traffic = Traffic(sessions)
    slot = meta_slot(cache, redis_cluster)
    async with traffic.running():
        source = redis_cluster.master_of_slot(slot)
        target = next(port for port in redis_cluster.masters() if port != source)
        moved = await asyncio.to_thread(redis_cluster.migrate_slot, slot, target, 1, 0.02)
        assert moved > 0, "the meta slot held version keys to move"
        entry_slot = redis_cluster.keyslot(entry_key)
        source = redis_cluster.master_of_slot(entry_slot)
        target = next(port for port in redis_cluster.masters() if port != source)
        await asyncio.to_thread(redis_cluster.migrate_slot, entry_slot, target, 1, 0.02)
    traffic.check(cache)
    await recovers(cache, sessions, sql)


async def _entry_keys(cluster: LocalCluster, prefix: str) -> list[str]:
    keys: list[str] = []
    for port in cluster.masters():
        keys += cluster.node_cli(port, "--scan", "--pattern", f"{prefix}:e:*").split()
    assert keys, "traffic filled entries"
    return keys


async def test_server_identity_follows_master_changes(redis_cluster) -> None:
    store = ClusterStore(parse_backend(redis_cluster.url), 1.0)
    meta = ClusterStore(parse_backend(redis_cluster.url), 1.0)
    meta.bind_namespace(Namespace("identity").epoch_key)
    meta_master = redis_cluster.master_of_slot(redis_cluster.keyslot(meta.meta_key or ""))
    other = next(port for port in redis_cluster.masters() if port != meta_master)
    try:
        before, meta_before = store.server_id(), meta.server_id()
        assert before is not None and meta_before is not None
        assert store.server_id() == before, "stable while nothing changes"
        await asyncio.to_thread(redis_cluster.failover, other)
        after = store.server_id()
        assert after != before, "any master replaced: the whole-cluster identity changes"
        assert meta.server_id() == meta_before, "another master's failover moves nothing"
        await asyncio.to_thread(redis_cluster.failover, meta_master)
        assert meta.server_id() != meta_before, "the meta slot's master changed"
    finally:
        await store.aclose()
        await meta.aclose()
        store.close()
        meta.close()


async def test_a_commit_between_the_two_halves_of_a_fill_leaves_nothing_stale(
    make_cache, sessions
) -> None:
    """The fill is split at the slot boundary (versions, then the entry): a writer committing
    in between makes the entry's stamp outdated before it lands, so it is never served."""
    cache = await make_cache()
    await seed(sessions, 1)
    store = cache._bound.runtime.store.raw
    assert isinstance(store, ClusterStore)
    original = store._run
    fired: list[bool] = []

    async def interleaved(requests: Any, *args: Any) -> Any:
        entry_write = any(cmd[0] == "SET" for _, cmds in requests for cmd in cmds)
        if entry_write and not fired:
            fired.append(True)
            async with sessions() as s:
                (await s.get(User, 1)).name = "1:1"
                await s.commit()
        return await original(requests, *args)

    store._run = interleaved  # type: ignore[method-assign]
    assert await get_name(sessions, 1) == "1:0"  # a miss, its fill held at the entry's SET
    await cache.flush_pending()
    assert fired, "the fill reached its second half"
    assert await get_name(sessions, 1) == "1:1"
    assert await get_name(sessions, 1) == "1:1"


async def test_a_dead_entry_master_costs_its_entries_not_the_invalidations(
    make_cache, sessions, sql, redis_cluster
) -> None:
    """While a master holding entries is down (before its replica takes over), reads of its
    entries are misses served by the database, and commits still invalidate on the meta node:
    the breaker stays closed, nothing is queued, nothing is stale."""
    cache = await make_cache()
    await seed(sessions, 12)
    meta_master = redis_cluster.master_of_slot(meta_slot(cache, redis_cluster))
    where: dict[int, int] = {}  # pk -> the master holding its get entry
    seen: set[str] = set()
    for pk in range(1, 13):
        await get_name(sessions, pk)
        await cache.flush_pending()
        for key in await _entry_keys(redis_cluster, cache.config.prefix):
            if key not in seen:
                seen.add(key)
                where[pk] = redis_cluster.master_of_slot(redis_cluster.keyslot(key))
    victim = next(port for port in where.values() if port != meta_master)
    on_victim = [pk for pk, port in where.items() if port == victim]
    replica = redis_cluster.kill_master(victim, wait=False)
    try:
        # only rows whose entries were on the dead master: every fetch touches it
        for round_ in range(1, 4):
            for pk in on_victim:
                assert await get_name(sessions, pk) == f"{pk}:{round_ - 1}"
                async with sessions() as s:
                    (await s.get(User, pk)).name = f"{pk}:{round_}"
                    await s.commit()
                assert await get_name(sessions, pk) == f"{pk}:{round_}"
        stats = cache.stats()
        assert stats["undelivered_invalidations"] == 0
        assert stats["circuit_breaker"]["state"] == "closed"
        sql.reset()
        await cache.flush_pending()
        await get_name(sessions, 1)
        await get_name(sessions, 1)
        assert sql.selects <= 2  # entries on live masters still hit
    finally:
        await asyncio.to_thread(redis_cluster.wait_promoted, replica)
        await asyncio.to_thread(redis_cluster.restart_node, victim)


async def _until_silent(port: int) -> None:
    """Until the node's DEBUG SLEEP has begun: a PING gets no answer within 50 ms."""
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # no retries: a retry reconnects, and its handshake would wait the sleep out
    client = aioredis.Redis(
        host="127.0.0.1", port=port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0)
    )
    try:
        for _ in range(200):
            try:
                await client.ping()
            except Exception:  # the timeout: it is asleep
                return
            await asyncio.sleep(0.01)  # polling a state, not waiting for one
        raise AssertionError(f"node {port} never went silent")
    finally:
        await client.aclose()


async def test_a_bump_no_replica_acknowledged_is_reported_undelivered(redis_cluster) -> None:
    """Redis replicates asynchronously: a bump only its master holds would be lost if that
    master failed now. It is acknowledged once a replica has it (WAIT), else it raises, and
    the cache keeps it for redelivery."""
    from sqlacache.backends.base import Bump
    from sqlacache.backends.cluster import ReplicationShortfall

    ns = Namespace("wait-test")
    key = ns.table_version("db", "t")
    store = ClusterStore(parse_backend(redis_cluster.url), 0.2)
    try:
        await store.bump_async(Bump(persistent=[key]), b"t1", 1000, 1000)
        replica = redis_cluster.replica_of(redis_cluster.master_of_slot(redis_cluster.keyslot(key)))
        silent = asyncio.ensure_future(asyncio.to_thread(redis_cluster.silence, replica, 0.8))
        await _until_silent(replica)
        with pytest.raises(ReplicationShortfall):
            await store.bump_async(Bump(persistent=[key]), b"t2", 1000, 1000)
        await silent
        await store.bump_async(Bump(persistent=[key]), b"t3", 1000, 1000)
        assert (await store.fetch_async([ns.entry("x"), key]))[1] == b"t3"
    finally:
        await store.aclose()


async def test_the_in_process_tier_follows_commits_on_the_cluster(make_cache, sessions, sql) -> None:
    """Bumps on the versions' slot publish over the cluster's classic pub/sub: the tier serves
    warm reads locally, and a commit makes the next read fresh."""
    reader = await make_cache(local=True)
    await seed(sessions, 3)
    tier = reader._bound.local_tier
    assert tier is not None
    deadline = time.monotonic() + 10.0
    while not tier.mirror.fresh():  # subscribed, heartbeat back
        assert time.monotonic() < deadline, "the tier's subscriber never went live on the cluster"
        await asyncio.sleep(0.05)
    # miss, then Redis hits (kept locally), then local hits once the mirror holds the versions
    # this process's own seed bumped (it waits for their messages to come back)
    deadline = time.monotonic() + 10.0
    while tier.stats()["hits"] == 0:
        assert await get_name(sessions, 1) == "1:0"
        await reader.flush_pending()
        assert time.monotonic() < deadline, ("never served locally", tier.stats())
        await asyncio.sleep(0.02)
    async with sessions() as s:
        (await s.get(User, 1)).name = "1:1"
        await s.commit()
    await reader.flush_pending()
    deadline = time.monotonic() + 5.0
    while await get_name(sessions, 1) != "1:1":
        assert time.monotonic() < deadline, "a commit never reached the tier on the cluster"
        await asyncio.sleep(0.01)


async def _until(condition: Any, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def _master_of(cluster: LocalCluster, replica: int) -> int:
    rows = cluster.cluster_nodes()
    master_id = next(r["master"] for r in rows if int(r["port"]) == replica)
    return next(int(r["port"]) for r in rows if r["id"] == master_id)


@pytest.mark.parametrize("role", ["master", "replica"])
async def test_the_tier_subscribes_on_another_node_when_its_node_dies(
    make_cache, sessions, redis_cluster, role
) -> None:
    """The URL names one node; when it dies (a master, then promoted over, or a replica), the
    tier's subscriber moves to another node the topology named (classic pub/sub reaches every
    node) and the tier serves locally again."""
    url_node = redis_cluster.ports[0]
    is_master = url_node in redis_cluster.masters()
    if is_master != (role == "master"):  # give the URL's node the role under test
        master = url_node if is_master else _master_of(redis_cluster, url_node)
        await asyncio.to_thread(redis_cluster.failover, master)
    reader = await make_cache(local=True)
    await seed(sessions, 3)
    tier = reader._bound.local_tier
    assert tier is not None

    async def fresh() -> bool:
        return tier.mirror.fresh()

    async def served_locally() -> bool:
        before = tier.stats()["hits"]
        assert await get_name(sessions, 1) == expected
        await reader.flush_pending()
        return tier.stats()["hits"] > before

    expected = "1:0"
    await _until(fresh, "the tier's subscriber never went live on the cluster")
    await _until(served_locally, "never served locally")
    if role == "master":
        await asyncio.to_thread(redis_cluster.kill_master, url_node)
    else:
        await asyncio.to_thread(redis_cluster.kill_node, url_node)
    try:
        await _until(fresh, "the subscriber stayed on the dead node", 30.0)
        async with sessions() as s:
            (await s.get(User, 1)).name = "1:1"
            await s.commit()
        expected = "1:1"
        await _until(served_locally, "no local hit after the node died", 30.0)
    finally:
        await asyncio.to_thread(redis_cluster.restart_node, url_node)


def test_one_cluster_cache_serves_one_event_loop_after_another(stack: Stack) -> None:
    """`asyncio.run()` twice with one cache (a loop per test, a worker restarting its loop):
    the second loop gets hits and its commits invalidate, with no transport error."""
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from tests.fixtures import SQLCounter, reset_schema

    cache = sqlacache.configure(
        stack.backend, models={"*": {"timeout": 300}}, prefix=f"loops{os.getpid()}{time.time_ns()}"
    )

    async def one_loop(expected: str, rename_to: str) -> int:
        engine = create_async_engine(stack.db_url)
        counter = SQLCounter()
        event.listen(engine.sync_engine, "before_cursor_execute", counter)
        await cache.bind(engine)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            assert await get_name(sessions, 1) == expected
            await cache.flush_pending()
            counter.reset()
            assert await get_name(sessions, 1) == expected
            hit = counter.selects == 0
            async with sessions() as s:
                (await s.get(User, 1)).name = rename_to
                await s.commit()
            assert await get_name(sessions, 1) == rename_to
            await cache.flush_pending()
            return int(hit)
        finally:
            await engine.dispose()

    async def prepare() -> None:
        engine = create_async_engine(stack.db_url)
        await reset_schema(engine)
        async with async_sessionmaker(engine)() as s:
            s.add(User(id=1, name="1:0"))
            await s.commit()
        await engine.dispose()

    asyncio.run(prepare())
    try:
        assert asyncio.run(one_loop("1:0", "1:1")) == 1
        assert asyncio.run(one_loop("1:1", "1:2")) == 1, "the second loop must get hits"
        assert cache.stats()["transport_errors"] == 0, cache.stats()["circuit_breaker"]
    finally:
        cache.disconnect_sync()
