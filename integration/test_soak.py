"""Soak: worker processes run a mixed read/write workload through the cache while Redis fails.

Four real worker processes (integration/soak_worker.py) read and write users and orders for a
bounded time (SQLACACHE_SOAK_SECONDS, default 15), each checking every read against the database.
Meanwhile the test injects faults: on a single Redis (behind a fault proxy) it restarts the server
(empty) twice, blackholes it and cuts it; on the local cluster it kills a master (its replica takes
over, the old master rejoins as a replica), silences the meta slot's master (DEBUG SLEEP, shorter
than the failover timeout) and fails the meta master over by hand. Then:
- no error reached the application (every operation of every worker succeeded);
- no stale read outside the documented bound: while a fault lasts and until the writer's queued
  invalidations are redelivered (each worker reports when it held undelivered invalidations; and
  at most the breaker's longest probe interval after a fault ends, plus a second), another
  process may serve an entry the writer could not invalidate (F3); outside these windows there
  must be none;
- no lost write: every order whose commit returned is in the database, and nothing else is;
- after the faults, a fresh cache reads exactly what the database holds.
It prints operations, reads checked, stale reads in and out of the bound, and faults injected.
With SQLACACHE_SOAK_TRACE=DIR the cluster soak's workers trace every Redis round, their writes,
COMMITs and checked reads; `python -m integration.soak_trace DIR` then tells, for each stale read,
which write it missed, when that write's bumps landed, and which fill stored the entry served.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

import sqlacache
from integration.conftest import PG_URL
from integration.faultkit import RedisServer, fault_proxy
from sqlacache.keys import Namespace
from sqlacache.resilience import Breaker
from tests.models import Order, User

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
USERS = 20
SECONDS = float(os.environ.get("SQLACACHE_SOAK_SECONDS", "15"))
#: How long after a fault ends another process may still serve what the writer could not
#: invalidate: until the writer's breaker probe redelivers (its longest interval), plus slack.
REDELIVERY_BOUND = Breaker.MAX_PROBE_INTERVAL + 1.0


class Faults:
    """The faults injected: name and wall-clock window (start, end)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.log: list[tuple[str, float, float]] = []

    async def window(self, name: str, fault: Any) -> None:
        begin = time.time()
        await fault()
        self.log.append((name, begin, time.time()))

    def summary(self) -> list[tuple[str, float, float]]:
        return [(n, round(b - self.started, 1), round(e - self.started, 1)) for n, b, e in self.log]

    def covers(self, t: float) -> bool:
        return any(begin <= t <= end + REDELIVERY_BOUND for _, begin, end in self.log)


async def sleep_until(faults: Faults, fraction: float) -> None:
    await asyncio.sleep(max(0.0, faults.started + fraction * SECONDS - time.time()))


async def run_workers(backend: str, prefix: str, tmp_path: Path) -> list[asyncio.Task[Any]]:
    async def one(worker: int) -> dict[str, Any]:
        stderr_path = tmp_path / f"worker-{worker}.err"
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "integration.soak_worker",
                "--pg",
                PG_URL,
                "--backend",
                backend,
                "--prefix",
                prefix,
                "--worker",
                str(worker),
                "--workers",
                str(WORKERS),
                "--seconds",
                str(SECONDS),
                "--users",
                str(USERS),
                cwd=str(ROOT),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            out, _ = await asyncio.wait_for(proc.communicate(), SECONDS + 120)
        if proc.returncode != 0 or not out.strip():
            raise AssertionError(
                f"soak worker {worker} exited with {proc.returncode}:\n"
                + stderr_path.read_text(errors="replace")[-4000:]
            )
        return dict(json.loads(out.splitlines()[-1]))

    return [asyncio.ensure_future(one(worker)) for worker in range(WORKERS)]


async def seed(sessions: Any) -> None:
    async with sessions() as s:
        s.add_all([User(id=pk, name=f"{pk}:0") for pk in range(1, USERS + 1)])
        await s.commit()


async def check_outcome(
    label: str,
    reports: list[dict[str, Any]],
    faults: Faults,
    engine: Any,
    backend: str,
    prefix: str,
) -> None:
    stale = [dict(s, worker=r["worker"]) for r in reports for s in r["stale"]]
    # a writer's invalidation that could not be delivered (an injected fault, or a deadline
    # missed on a loaded machine) lets other processes serve the old entry until redelivery
    undelivered = [(b, e) for r in reports for b, e in r["pending"]]

    def explained(t: float) -> bool:
        return faults.covers(t) or any(b <= t <= e + 0.5 for b, e in undelivered)

    outside = [s for s in stale if not explained(float(s["t"]))]
    errors = [e for r in reports for e in r["errors"]]
    orders = sorted(o for r in reports for o in r["orders"])
    print(
        f"\nsoak on {label}: {len(reports)} workers, {SECONDS:.0f}s,"
        f" operations={sum(r['ops'] for r in reports)}"
        f" reads_checked={sum(r['reads_checked'] for r in reports)}"
        f" writes={sum(r['writes'] for r in reports)} hits={sum(r['hits'] for r in reports)}"
        f" cache_fallbacks={sum(r['cache_errors'] for r in reports)}"
        f" stale_within_bound={len(stale) - len(outside)} stale_outside_bound={len(outside)}"
        f" errors={len(errors)} faults={faults.summary()}"
        f" undelivered_at_exit={sum(r['pending_at_exit'] for r in reports)}"
    )
    for item in stale[:10]:
        at = float(item["t"]) - faults.started
        print(f"  stale read at {at:.2f}s by worker {item['worker']}: {item['what']}")
    assert errors == [], errors[:5]
    assert outside == [], outside[:5]
    assert sum(r["hits"] for r in reports) > 0, "the cache served hits between the faults"
    async with engine.connect() as conn:
        stored = sorted(int(i) for (i,) in (await conn.execute(text("SELECT id FROM orders"))))
        truth = dict((await conn.execute(text("SELECT id, name FROM users"))).all())
    assert stored == orders, "every committed write is in the database, and nothing else"
    # after the faults, what the cache serves is what the database holds
    cache = sqlacache.configure(backend=backend, models={"*": {"timeout": 300}}, prefix=prefix)
    await cache.bind(engine)
    try:
        from sqlalchemy.ext.asyncio import AsyncSession

        for _ in range(2):  # the second round is served by the cache where it can be
            async with AsyncSession(engine) as s:
                for pk in range(1, USERS + 1):
                    assert (await s.get(User, pk)).name == truth[pk]
            async with AsyncSession(engine) as s:
                rows = (await s.execute(select(User).order_by(User.id))).scalars()
                assert {u.id: u.name for u in rows} == truth
                count = await s.scalar(select(func.count()).select_from(Order))
                assert count == len(orders)
            await cache.flush_pending()
    finally:
        await cache.invalidate_all()
        await cache.disconnect()


async def test_soak_on_a_single_redis_with_restarts_and_blackholes(
    engine, sessions, tmp_path: Path
) -> None:
    await seed(sessions)
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    server = RedisServer()
    try:
        await asyncio.to_thread(server.start)
        async with fault_proxy(server.port) as proxy:
            faults = Faults()
            workers = await run_workers(proxy.url, prefix, tmp_path)

            async def blackhole() -> None:
                proxy.blackhole()
                await asyncio.sleep(1.5)
                await proxy.restore()

            async def cut() -> None:
                proxy.cut()
                await asyncio.sleep(1.0)
                await proxy.restore()

            await sleep_until(faults, 0.2)
            await faults.window("restart", lambda: asyncio.to_thread(server.restart))
            await sleep_until(faults, 0.35)
            await faults.window("blackhole", blackhole)
            await sleep_until(faults, 0.5)
            await faults.window("cut", cut)
            await sleep_until(faults, 0.6)
            await faults.window("restart", lambda: asyncio.to_thread(server.restart))
            reports = list(await asyncio.gather(*workers))
            await check_outcome("a single Redis", reports, faults, engine, proxy.url, prefix)
    finally:
        server.cleanup()


async def test_soak_on_the_cluster_with_failovers_and_a_silent_master(
    engine, sessions, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue("redis_cluster")
    await seed(sessions)
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    meta_slot = cluster.keyslot(Namespace(prefix).epoch_key)
    faults = Faults()
    workers = await run_workers(cluster.url, prefix, tmp_path)
    meta_master = cluster.master_of_slot(meta_slot)
    other = next(port for port in cluster.masters() if port != meta_master)

    try:
        await sleep_until(faults, 0.15)
        await faults.window(
            "silence the meta master 0.5s",
            lambda: asyncio.to_thread(cluster.silence, meta_master, 0.5),
        )
        await sleep_until(faults, 0.3)
        await faults.window(
            "fail the meta master over", lambda: asyncio.to_thread(cluster.failover, meta_master)
        )
        await sleep_until(faults, 0.45)
        await faults.window(
            "kill an entry master", lambda: asyncio.to_thread(cluster.kill_master, other)
        )
        reports = list(await asyncio.gather(*workers))
    finally:
        await asyncio.to_thread(cluster.restart_node, other)  # back as a replica: 3 + 3 again
    trace = os.environ.get("SQLACACHE_SOAK_TRACE")
    if trace:  # the workers traced every round (integration/soak_trace.py)
        faults_seen = {"started": faults.started, "log": faults.log, "meta": meta_master}
        Path(trace, "faults.json").write_text(json.dumps(faults_seen))
    await check_outcome("the cluster", reports, faults, engine, cluster.url, prefix)
