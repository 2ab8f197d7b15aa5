"""`make bench`: the performance bars P1-P10, measured against PostgreSQL (asyncpg) and Redis.

One process, one run: cached, uncached and the two reference figures (floor, RTT) are measured in
alternating batches, so their ratios hold on a noisy machine. Falls back to SQLite and mem:// when
the services are absent, and says so. Writes bench/results/<db>-<backends>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import realistic
import sqlalchemy
from harness import (
    HOT_ROWS,
    N_ROWS,
    FloorCache,
    Samples,
    SQLCounter,
    User,
    create_schema,
    cycle,
    floor_sessions,
    interleave,
    make_engine,
    sessions_for,
    throughput,
)
from redis_meter import PREFIX, Meter, reachable
from report import bars, print_report, write_chart, write_json
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import sqlacache

# Where the bench runs (see bench/README.md): the database is created if missing; its `bench_users`,
# `bench_posts` and `bench_comments` tables are dropped and recreated. In Redis only keys under `bench:` are
# written and deleted, never the rest of the db.
PG_URL = os.environ.get(
    "SQLACACHE_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/sqlacache_bench"
)
REDIS_URL = os.environ.get("SQLACACHE_BENCH_REDIS", "redis://127.0.0.1:6379/12")
RESULTS = Path(
    os.environ.get("SQLACACHE_BENCH_RESULTS", Path(__file__).resolve().parent / "results")
)

Sessions = async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class Settings:
    rounds: int = 20  # per read workload: rounds x batch samples per variant
    batch: int = 20
    commit_samples: int = 300
    throughput_seconds: float = 0.8
    throughput_repeats: int = 3
    round_trip_ops: int = 100
    stampede: int = 100

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            rounds=4,
            batch=10,
            commit_samples=40,
            throughput_seconds=0.5,
            throughput_repeats=1,
            round_trip_ops=20,
        )


# -- the read workloads ----------------------------------------------------------------------------


async def get_by_pk(session: AsyncSession, pk: int) -> Any:
    return await session.get(User, pk)


def fetch(rows: int) -> Callable[[AsyncSession, int], Awaitable[Any]]:
    async def run(session: AsyncSession, low: int) -> Any:
        stmt = select(User).where(User.id >= low).order_by(User.id).limit(rows)
        return (await session.execute(stmt)).scalars().all()

    return run


async def count_range(session: AsyncSession, low: int) -> Any:
    stmt = select(func.count()).select_from(User).where(User.id > low, User.id <= low + 1_000)
    return await session.scalar(stmt)


@dataclass
class ReadWorkload:
    """One statement shape; a hit reuses `hit_keys`, a miss takes a key nobody has read yet."""

    name: str
    label: str
    run: Callable[[AsyncSession, int], Awaitable[Any]]
    hit_keys: tuple[int, ...]
    fresh_from: int
    fresh_to: int
    _next: int = field(default=0, init=False)

    def fresh(self) -> int:
        key = self.fresh_from + self._next
        if key > self.fresh_to:
            raise RuntimeError(f"{self.name}: out of fresh keys; raise N_ROWS")
        self._next += 1
        return key

    def reset(self) -> None:
        self._next = 0

    def op(self, sessions: Sessions, key: Callable[[int], int]) -> Callable[[int], Awaitable[None]]:
        async def run(number: int) -> None:
            async with sessions() as session:
                await self.run(session, key(number))

        return run


WORKLOADS = (
    ReadWorkload("get", "get by pk", get_by_pk, tuple(range(1, 51)), 1_001, 14_000),
    ReadWorkload("fetch20", "fetch 20 rows", fetch(20), tuple(range(1, 2_000, 100)), 2_001, 18_000),
    ReadWorkload(
        "fetch100", "fetch 100 rows", fetch(100), tuple(range(1, 2_000, 100)), 2_001, 18_000
    ),
    ReadWorkload("count", "count", count_range, tuple(range(0, 2_000, 100)), 2_001, 18_000),
)
COMMIT_PKS = (14_001, 15_000)  # rows the commit workload writes: a third per variant
ROUND_TRIP_COMMIT_PKS = (15_001, 16_000)
STAMPEDE_PKS = (19_901, 19_902)
FIRST_BURST_PK = 19_900
STAMPEDE_FETCH_LOW = 18_500


# -- the backends ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One phase of the run: every measurement with the cache configured this way.

    `label` names the phase in the JSON and in `report.bars`. A variant is one more entry in
    `backends()`, e.g. the in-process tier in front of Redis once it exists:
        Backend("redis_tier", redis_url, {"local_tier": {...}}, uses_redis=True)
    and its bars in `report.BARS` (they print "n/a (not built)" until then).
    """

    label: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)  # more `configure()` arguments
    uses_redis: bool = False


def backends(redis_url: str | None, cluster_url: str | None = None) -> list[Backend]:
    out = [Backend("mem", "mem://")]
    if redis_url:
        out.append(Backend("redis", redis_url, uses_redis=True))
        out.append(Backend("redis_tier", redis_url, {"local": True}, uses_redis=True))
    if cluster_url and redis_url:  # RTT, the reference, is measured on the single Redis
        out.append(Backend("cluster", cluster_url, uses_redis=True))
    return out


@contextlib.contextmanager
def local_cluster(notes: list[str]) -> Iterator[str | None]:
    """A 3 + 3 Redis Cluster on loopback ports for the P9 phase (the tests' own kit), unless
    SQLACACHE_BENCH_CLUSTER=0 or redis-server cannot start one here."""
    if os.environ.get("SQLACACHE_BENCH_CLUSTER", "1") == "0" or not shutil.which("redis-server"):
        notes.append("no Redis Cluster phase (SQLACACHE_BENCH_CLUSTER=0 or no redis-server)")
        yield None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from integration.clusterkit import LocalCluster

    cluster = LocalCluster()
    try:
        cluster.start()
    except Exception as exc:
        notes.append(f"no Redis Cluster phase: the local cluster did not start ({exc})")
        cluster.stop()
        yield None
        return
    try:
        yield cluster.url
    finally:
        cluster.stop()


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Env:
    """What the phases share: the database, the uncached engine, the floor and the meters."""

    db_url: str
    db_label: str
    redis_url: str | None
    notes: list[str]
    settings: Settings
    plain: AsyncEngine
    plain_sessions: Sessions
    floor: FloorCache
    floor_sessions: Sessions
    sql: SQLCounter
    meter: Meter | None
    versions: dict[str, str]
    warnings: list[str] = field(default_factory=list)


async def database_url(notes: list[str]) -> tuple[str, str, str]:
    """(url, label, server version): PostgreSQL if it answers, else a SQLite file."""
    import asyncpg

    dsn = PG_URL.replace("postgresql+asyncpg", "postgresql")
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn), 3)
    except asyncpg.InvalidCatalogNameError:
        await _create_database(dsn)
        conn = await asyncio.wait_for(asyncpg.connect(dsn), 3)
    except Exception as exc:
        path = Path(tempfile.mkdtemp(prefix="sqlacache-bench-")) / "bench.sqlite"
        notes.append(
            f"PostgreSQL unreachable at {PG_URL} ({type(exc).__name__}: {exc}): "
            f"FALLBACK to SQLite {path}; figures are not comparable with the bars"
        )
        return f"sqlite+aiosqlite:///{path}", "sqlite", "sqlite " + sqlite_version()
    version = str(await conn.fetchval("SHOW server_version"))
    await conn.close()
    return PG_URL, "postgresql", "PostgreSQL " + version


async def _create_database(dsn: str) -> None:
    import asyncpg

    base, _, name = dsn.rpartition("/")
    admin = await asyncpg.connect(base + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


def sqlacache_source() -> str:
    """Which sqlacache was measured: its directory, and the git commit if it is a checkout."""
    import subprocess

    where = Path(sqlacache.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(where)
    return f"{where} @ {commit}{' + uncommitted changes' if dirty else ''}"


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


async def main(settings: Settings) -> int:
    started = time.perf_counter()
    notes: list[str] = []
    db_url, db_label, db_version = await database_url(notes)
    redis_problem = await reachable(REDIS_URL)
    redis_url: str | None = None if redis_problem else REDIS_URL
    if redis_problem:
        notes.append(
            f"Redis unreachable at {REDIS_URL} ({redis_problem}): FALLBACK to mem:// only; "
            "the redis:// rows and bars P2-P5 are skipped"
        )
    meter = Meter(redis_url) if redis_url else None
    versions = {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "sqlacache": sqlacache.__version__,
        "sqlacache_source": sqlacache_source(),
        "database": db_version,
        "cpus": str(os.cpu_count()),
    }
    if meter is not None:
        versions["redis"] = "Redis " + await meter.prepare()

    plain = make_engine(db_url)
    await create_schema(plain)  # users, and the (empty) posts and comments of P10
    await realistic.seed(plain)
    floor = FloorCache()
    floor.install()
    sql = SQLCounter()
    sql.listen(plain)
    env = Env(
        db_url=db_url,
        db_label=db_label,
        redis_url=redis_url,
        notes=notes,
        settings=settings,
        plain=plain,
        plain_sessions=sessions_for(plain),
        floor=floor,
        floor_sessions=floor_sessions(plain),
        sql=sql,
        meter=meter,
        versions=versions,
    )
    print(f"sqlacache bench: {db_version} ({db_label}), " + (versions.get("redis") or "no Redis"))
    print(f"sqlacache {versions['sqlacache_source']}")
    for note in notes:
        print("NOTE:", note)

    phases: dict[str, Any] = {}
    cluster = local_cluster(notes) if redis_url else contextlib.nullcontext(None)
    try:
        cluster_url = cluster.__enter__()
        for backend in backends(redis_url, cluster_url):
            print(
                f"... measuring {backend.label} ({time.perf_counter() - started:.0f}s)", flush=True
            )
            phases[backend.label] = await run_phase(env, backend)
    finally:
        cluster.__exit__(None, None, None)
        floor.remove()
        sql.unlisten()
        await plain.dispose()
        if db_label == "sqlite":
            shutil.rmtree(Path(db_url.removeprefix("sqlite+aiosqlite:///")).parent, True)
        if meter is not None:
            await meter.delete_bench_keys()
            await meter.aclose()

    elapsed = time.perf_counter() - started
    results: dict[str, Any] = {
        "meta": {
            "database": db_label,
            "db_url": db_url,
            "redis_url": redis_url,
            "versions": versions,
            "notes": notes,
            "warnings": env.warnings,
            "rows": N_ROWS,
            "hot_rows": HOT_ROWS,
            "settings": settings.__dict__,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(elapsed, 1),
        },
        "phases": phases,
    }
    results["bars"] = bars(results)
    stem = f"{db_label}-{'-'.join(phases)}"
    json_path = write_json(results, RESULTS / f"{stem}.json")
    png_path = write_chart(results, RESULTS / f"{stem}.png")
    print_report(results)
    for path in (json_path, png_path):
        print("wrote", path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
    print(f"elapsed {elapsed:.1f}s")
    return 0


async def run_phase(env: Env, backend: Backend) -> dict[str, Any]:
    """Every measurement on one backend, with the cache bound to a fresh engine of its own."""
    meter = env.meter if backend.uses_redis else None
    if meter is not None:
        await meter.delete_bench_keys()
    engine = make_engine(env.db_url)
    env.sql.listen(engine)
    cache = sqlacache.configure(
        backend=backend.url, models={"*": {"timeout": 600}}, prefix=PREFIX, **backend.options
    )
    await cache.bind(engine)
    cached = sessions_for(engine)
    env.floor.results.clear()
    for workload in WORKLOADS:
        workload.reset()
    gc.collect()
    out: dict[str, Any] = {"backend": backend.url, "transport_errors": {}, "sections": {}}

    async def section(name: str, work: Awaitable[Any]) -> Any:
        """Run one measurement; keep what the cache counted meanwhile (hits, misses, errors)."""
        before = cache.stats()
        result = await work
        after = cache.stats()
        counted = {k: after["totals"][k] - before["totals"][k] for k in after["totals"]}
        counted["transport_errors"] = after["transport_errors"] - before["transport_errors"]
        out["sections"][name] = counted
        if counted["transport_errors"]:
            out["transport_errors"][name] = counted["transport_errors"]
            await settle(cache)
        return result

    try:
        out["reads"] = await section(
            "reads", measure_reads(env, cached, meter, cache.flush_pending)
        )
        if meter is not None:
            out["round_trips"] = await section(
                "round_trips", measure_round_trips(meter, cached, env.settings.round_trip_ops)
            )
        out["commit"] = await section(
            "commit", measure_commit(env, cached, meter, cache.flush_pending)
        )
        out["realistic"] = await section("realistic", measure_realistic(env, cached, cache, meter))
        # The first burst of a process meets an almost empty Redis connection pool; then the pool
        # is grown gently (as a server's load would grow it) and the herds run again.
        first = await section("stampede_first_burst", first_burst(env, cached))
        await section("ramp", ramp(cached))
        out["stampede"] = await section("stampede", measure_stampede(env, cached))
        out["stampede"]["first_burst"] = first
        await section("throughput_warm_up", warm_hot_rows(cached))
        out["throughput"] = await section("throughput", measure_throughput(env, cached))
        breaker = cache.stats()["circuit_breaker"]
        out["circuit_breaker"] = breaker
    finally:
        await cache.disconnect()
        env.sql.unlisten(engine)
        await engine.dispose()
    return out


async def measure_reads(
    env: Env, cached: Sessions, meter: Meter | None, settle: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    s = env.settings
    out: dict[str, Any] = {}
    for workload in WORKLOADS:
        hot = cycle(workload.hit_keys)

        def fresh(_number: int, workload: ReadWorkload = workload) -> int:
            return workload.fresh()

        variants: dict[str, Callable[[int], Awaitable[float | None]]] = {
            "hit": workload.op(cached, hot),
            "miss": workload.op(cached, fresh),
            # Uncached = the same session code on an engine the cache is not bound to: that is
            # the application without sqlacache, and the only definition that also works for
            # writes (`cache=False` does not apply to DML, which is always tracked). Only the
            # class-level listeners remain; they return at once for an unbound engine.
            "uncached": workload.op(env.plain_sessions, hot),
            "floor": workload.op(env.floor_sessions, hot),
        }
        if meter is not None:
            variants["rtt"] = meter.rtt
            variants["floor_get"] = then_get(variants["floor"], meter)
            variants["uncached_2get"] = then_get(then_get(variants["uncached"], meter), meter)
        for number in range(len(workload.hit_keys)):  # fill the cache, the floor, the pools
            for name in ("hit", "uncached", "floor"):
                await variants[name](number)
        for number in range(3):
            await variants["miss"](number)
            if meter is not None:
                await meter.rtt(number)
        samples = await interleave(variants, s.rounds, s.batch, env.sql, settle)
        out[workload.name] = {name: sample.summary() for name, sample in samples.items()}
        env.warnings += check_selects(f"{backend_label(meter)} {workload.name}", samples)
    return out


def then_get(op: Callable[[int], Awaitable[Any]], meter: Meter) -> Callable[[int], Awaitable[None]]:
    """The floor's read, then one RTT GET, in one operation: floor + RTT as a hit pays it.

    On a loaded machine a round trip right after CPU work costs far more than one in a tight
    loop (the woken Redis takes the CPU; this process waits for its next slice), so the two
    figures measured apart understate what any Redis-backed hit must pay.
    """

    async def run(number: int) -> None:
        await op(number)
        await meter.rtt(number)

    return run


def backend_label(meter: Meter | None) -> str:
    return "mem://" if meter is None else "redis://"


def check_selects(workload: str, samples: dict[str, Samples]) -> list[str]:
    """A hit must send no SELECT and a miss exactly one, or the figures measure something else."""
    expected = {"hit": 0.0, "floor": 0.0, "miss": 1.0, "uncached": 1.0}
    warnings = []
    for name, want in expected.items():
        ops = len(samples[name].micros)
        got = samples[name].selects
        if got != want * ops:
            warnings.append(
                f"{workload} {name}: {got} SELECTs in {ops} ops, expected {want:.0f} per op"
                " (a transport error sends reads to the database)"
            )
            print(f"WARNING: {warnings[-1]}", flush=True)
    return warnings


async def measure_round_trips(meter: Meter, cached: Sessions, n: int) -> dict[str, Any]:
    """Redis commands and round trips per get hit, get miss, fetch100 hit and miss."""
    get, fetch100 = WORKLOADS[0], WORKLOADS[2]
    out = {
        "get_hit": await meter.per_op(get.op(cached, cycle(get.hit_keys)), 0, n),
        "get_miss": await meter.per_op(get.op(cached, lambda _n: get.fresh()), 0, n),
        "fetch100_hit": await meter.per_op(fetch100.op(cached, cycle(fetch100.hit_keys)), 0, n),
        "fetch100_miss": await meter.per_op(fetch100.op(cached, lambda _n: fetch100.fresh()), 0, n),
    }
    return out


_writes = itertools.count()


def fresh_value(text: str) -> str:
    """A value no earlier write of this run stored: the mem:// and redis:// phases write the same
    rows, and setting a column to the value it holds sends no UPDATE (and invalidates nothing)."""
    return f"{text} #{next(_writes)}"


def committer(
    sessions: Sessions, first_pk: int, after: Callable[[int], Awaitable[None]] | None = None
) -> Callable[[int], Awaitable[float]]:
    """Load a row, change it, commit; returns the µs of `commit()` (flush, UPDATE, COMMIT, and
    for the cached engine the invalidation), plus `after` when given. The row is loaded with
    `cache=False` so that only the commit's own Redis traffic shows in the round-trip counts; on
    the unbound engine the option is ignored."""

    async def op(number: int) -> float:
        async with sessions() as session:
            user = await session.get(User, first_pk + number, execution_options={"cache": False})
            assert user is not None
            user.name = fresh_value(f"renamed {number}")
            start = time.perf_counter_ns()
            await session.commit()
            if after is not None:
                await after(number)
            return (time.perf_counter_ns() - start) / 1000

    return op


async def measure_commit(
    env: Env, cached: Sessions, meter: Meter | None, settle: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    low, high = COMMIT_PKS
    third = (high - low + 1) // 3  # each variant writes rows of its own
    n = min(env.settings.commit_samples, third)
    batch = 10
    variants: dict[str, Callable[[int], Awaitable[float | None]]] = {
        "cached": committer(cached, low),
        "uncached": committer(env.plain_sessions, low + third),
    }
    if meter is not None:
        variants["rtt"] = meter.rtt
        variants["uncached_2get"] = committer(
            env.plain_sessions, low + 2 * third, then_get(meter.rtt, meter)
        )
    samples = await interleave(variants, max(1, n // batch), batch, env.sql, settle)
    out: dict[str, Any] = {name: sample.summary() for name, sample in samples.items()}
    if meter is not None:
        low_rt, high_rt = ROUND_TRIP_COMMIT_PKS
        ops = min(env.settings.round_trip_ops, (high_rt - low_rt + 1) // 3)
        out["round_trips"] = await meter.per_op(committer(cached, low_rt), 0, ops)
    return out


async def measure_realistic(
    env: Env, cached: Sessions, cache: sqlacache.CacheManager, meter: Meter | None
) -> dict[str, Any]:
    """P10: SQL and hits per step (cold, warm, after one write, warm again), then the warm
    request timed against the same request uncached and on the floor, interleaved."""
    out = await realistic.measure(cached, cache.stats, env.sql, cache.flush_pending)
    variants: dict[str, Callable[[int], Awaitable[float | None]]] = {
        "warm": realistic.request_op(cached),
        "uncached": realistic.request_op(env.plain_sessions),
        "floor": realistic.request_op(env.floor_sessions),
    }
    if meter is not None:
        variants["rtt"] = meter.rtt
    for number in range(realistic.PAGES):  # every page warm, on the floor too
        for name in ("warm", "uncached", "floor"):
            await variants[name](number)
    await cache.flush_pending()
    s = env.settings
    samples = await interleave(variants, s.rounds // 2, s.batch // 2, env.sql, cache.flush_pending)
    out["timing"] = {name: sample.summary() for name, sample in samples.items()}
    if meter is not None:
        out["round_trips"] = await meter.per_op(variants["warm"], 0, env.settings.round_trip_ops)
    return out


def throughput_ops(reads: Sessions, writes: Sessions) -> tuple[Any, Any]:
    """The throughput workload's read (`get` by pk) and write (load, change, commit)."""

    async def read(pk: int) -> None:
        async with reads() as session:
            await session.get(User, pk)

    async def write(pk: int, value: int) -> None:
        async with writes() as session:
            user = await session.get(User, pk)
            assert user is not None
            user.name = fresh_value(f"tp {value}")
            await session.commit()

    return read, write


async def warm_hot_rows(cached: Sessions) -> None:
    """Steady state for the throughput workload: every hot row is cached (10 tasks at a time)."""
    read, _ = throughput_ops(cached, cached)

    async def warm(worker: int) -> None:
        for pk in range(1 + worker, HOT_ROWS + 1, 10):
            await read(pk)

    await asyncio.gather(*(warm(w) for w in range(10)))


async def measure_throughput(env: Env, cached: Sessions) -> dict[str, Any]:
    """ops/s at 1 and 50 tasks: 95 % `get` by pk, 5 % load-change-commit, on `HOT_ROWS` rows.

    `floor` serves its reads from the floor's dict (writes go to the database uncached, and its
    reads may be stale): not a cache anyone could ship, but the throughput ceiling of any cache
    inside the ORM in this one Python process, which tells whether P6 is reachable here at all.
    """
    variants = {
        "cached": throughput_ops(cached, cached),
        "uncached": throughput_ops(env.plain_sessions, env.plain_sessions),
        "floor": throughput_ops(env.floor_sessions, env.plain_sessions),
    }
    for pk in range(1, HOT_ROWS + 1):
        await variants["floor"][0](pk)
    totals: dict[tuple[int, str], list[float]] = {}
    s = env.settings
    names = list(variants)
    for repeat in range(s.throughput_repeats):
        for tasks in (1, 50):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                read, write = variants[name]
                ops, seconds = await throughput(read, write, tasks, s.throughput_seconds, repeat)
                total = totals.setdefault((tasks, name), [0.0, 0.0])
                total[0] += ops
                total[1] += seconds
    out: dict[str, Any] = {}
    for (tasks, name), (done, elapsed) in sorted(totals.items()):
        out.setdefault(f"tasks_{tasks}", {})[name] = {
            "ops_per_s": round(done / elapsed, 1),
            "ops": int(done),
        }
    return out


async def herd(env: Env, cached: Sessions, read: Callable[[AsyncSession], Awaitable[Any]]) -> int:
    """`settings.stampede` concurrent reads, each in its own session; SELECTs the database got."""

    async def one() -> None:
        async with cached() as session:
            await read(session)

    before = env.sql.selects
    await asyncio.gather(*(one() for _ in range(env.settings.stampede)))
    return env.sql.selects - before


async def first_burst(env: Env, cached: Sessions) -> int:
    """P7 as a fresh process meets it: the first concurrent burst, on a key never read."""
    return await herd(env, cached, lambda s: s.get(User, FIRST_BURST_PK))


async def ramp(cached: Sessions) -> None:
    """Concurrent hits in waves of 10 more tasks each, up to 100: what a warming server does."""
    for width in range(10, 101, 10):

        async def one(pk: int) -> None:
            async with cached() as session:
                await session.get(User, pk)

        await asyncio.gather(*(one(1 + i % 50) for i in range(width)))


async def settle(cache: sqlacache.CacheManager, limit: float = 10.0) -> None:
    """Wait until the breaker is closed and no invalidation waits for redelivery, so one
    section's trouble does not leak into the next one's figures: a redelivered invalidation
    bumps its tables (and a held lease refuses fills) in the middle of whatever runs next."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        await cache.flush_pending()
        stats = cache.stats()
        if stats["circuit_breaker"]["state"] == "closed" and not stats["pending_invalidations"]:
            return
        await asyncio.sleep(0.05)


async def measure_stampede(env: Env, cached: Sessions) -> dict[str, Any]:
    """P7: 100 concurrent reads of one key nobody has cached; SELECTs the database received."""
    cold_pk, written_pk = STAMPEDE_PKS
    out: dict[str, Any] = {"readers": env.settings.stampede}
    out["get_cold"] = await herd(env, cached, lambda s: s.get(User, cold_pk))

    async with cached() as session:  # cache the row, then make it stale by writing it
        await session.get(User, written_pk)
    async with cached() as session:
        user = await session.get(User, written_pk)
        assert user is not None
        user.name = fresh_value("stampede")
        await session.commit()
    out["get_after_write"] = await herd(env, cached, lambda s: s.get(User, written_pk))
    out["fetch100_cold"] = await herd(env, cached, lambda s: fetch(100)(s, STAMPEDE_FETCH_LOW))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke test")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(Settings.quick() if args.quick else Settings())))
