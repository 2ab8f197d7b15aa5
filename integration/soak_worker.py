"""One worker process of the soak test (integration/test_soak.py).

Runs a mixed read/write workload through its own `CacheManager` until a deadline, and checks every
read against the database: before each cached read it reads the truth with plain SQL on an engine
the cache is not bound to, and the cached result must not be older than that truth (names carry a
per-row sequence number; each row has exactly one writer, so sequence numbers only grow). Writes
update the rows this worker owns and insert orders. At the end it prints one JSON line: counts,
stale reads (with their wall-clock time), errors, and the ids of the orders whose commit returned.

    python -m integration.soak_worker --pg URL --backend URL --prefix P --worker W --workers N
        --seconds S --users U
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any


def seq_of(name: str) -> int:
    return int(name.rsplit(":", 1)[1])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import func, select, text, update
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    import sqlacache
    from integration import soak_trace
    from tests.models import Order, User

    trace_dir = os.environ.get("SQLACACHE_SOAK_TRACE")
    if trace_dir:
        soak_trace.install(trace_dir, args.worker)

    engine = create_async_engine(args.pg, pool_size=3)
    truth_engine = create_async_engine(args.pg, pool_size=2)
    cache = sqlacache.configure(
        backend=args.backend, models={"*": {"timeout": 300}}, prefix=args.prefix
    )
    await cache.bind(engine)
    if trace_dir:
        from sqlalchemy import event

        @event.listens_for(engine.sync_engine, "commit")
        def _commit(conn: Any) -> None:  # just before COMMIT is sent
            soak_trace.emit({"k": "COMMIT", "t": time.time()})

    sessions = async_sessionmaker(engine, expire_on_commit=False)
    rng = random.Random(args.worker)
    own = [pk for pk in range(1, args.users + 1) if pk % args.workers == args.worker]
    seqs = dict.fromkeys(own, 0)
    report: dict[str, Any] = {
        "worker": args.worker,
        "ops": 0,
        "reads_checked": 0,
        "writes": 0,
        "stale": [],
        "errors": [],
        "orders": [],
        "hits": 0,
        # wall-clock windows in which this worker held invalidations it could not deliver
        "pending": [],
    }
    pending_since: float | None = None
    op_started = time.time()
    deadline = time.monotonic() + args.seconds
    order_id = args.worker * 1_000_000

    async def truth_names() -> dict[int, str]:
        async with truth_engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, name FROM users"))).all()
        return {int(pk): str(name) for pk, name in rows}

    async def truth_orders(pk: int) -> int:
        async with truth_engine.connect() as conn:
            query = text("SELECT count(*) FROM orders WHERE user_id = :pk")
            return int((await conn.execute(query, {"pk": pk})).scalar_one())

    def stale(kind: str, what: str) -> None:
        report["stale"].append({"t": time.time(), "kind": kind, "what": what})

    def check_names(kind: str, times: tuple[float, float], got: dict[int, str], truth: Any) -> None:
        """Names read through the cache against the truth read just before (traced)."""
        soak_trace.emit(
            {"k": "fetch", "kind": kind, "t_truth": times[0], "t0": times[1], "t1": time.time()}
        )
        for pk, name in got.items():
            if seq_of(name) < seq_of(truth[pk]):
                stale(kind, f"user {pk}: {name} after the database had {truth[pk]}")
                soak_trace.emit(
                    {"k": "stale", "t": time.time(), "pk": pk, "name": name, "truth": truth[pk]}
                )

    while time.monotonic() < deadline:
        report["ops"] += 1
        previous_started, op_started = op_started, time.time()
        undelivered = cache.stats()["undelivered_invalidations"]
        roll = rng.random()
        try:
            if roll < 0.2:
                pk = rng.choice(own)
                seqs[pk] += 1
                order_id += 1
                t_begin = time.time()
                async with sessions() as s:
                    if rng.random() < 0.5:
                        (await s.get(User, pk)).name = f"{pk}:{seqs[pk]}"
                    else:
                        stmt = update(User).where(User.id == pk).values(name=f"{pk}:{seqs[pk]}")
                        await s.execute(stmt)
                    s.add(Order(id=order_id, user_id=pk, total=seqs[pk]))
                    await s.commit()
                soak_trace.emit(
                    {"k": "write", "pk": pk, "seq": seqs[pk], "t0": t_begin, "t1": time.time()}
                )
                report["orders"].append(order_id)
                report["writes"] += 1
            elif roll < 0.65:
                pk = rng.randint(1, args.users)
                t_truth = time.time()
                truth = await truth_names()
                t_read = time.time()
                async with sessions() as s:
                    name = (await s.get(User, pk)).name
                check_names("get", (t_truth, t_read), {pk: name}, truth)
                report["reads_checked"] += 1
            elif roll < 0.85:
                t_truth = time.time()
                truth = await truth_names()
                t_read = time.time()
                async with sessions() as s:
                    stmt = select(User).where(User.id <= 10).order_by(User.id)
                    rows = {u.id: u.name for u in (await s.execute(stmt)).scalars()}
                check_names("fetch", (t_truth, t_read), rows, truth)
                report["reads_checked"] += 1
            else:
                pk = rng.randint(1, args.users)
                floor = await truth_orders(pk)
                async with sessions() as s:
                    stmt = select(func.count()).select_from(Order).where(Order.user_id == pk)
                    count = int((await s.execute(stmt)).scalar_one())
                if count < floor:
                    stale("count", f"orders of {pk}: {count} after the database had {floor}")
                report["reads_checked"] += 1
        except Exception as exc:  # anything reaching the application is a failure
            report["errors"].append(f"{type(exc).__name__}: {exc}")
        stats = cache.stats()
        failed_now = stats["undelivered_invalidations"] > undelivered
        if (failed_now or stats["pending_invalidations"]) and pending_since is None:
            # from the previous operation on: a failed background delivery (an announcement)
            # is seen one operation late (a redelivery may already have landed: then a moment)
            pending_since = previous_started
        if not stats["pending_invalidations"] and pending_since is not None:
            report["pending"].append((pending_since, time.time() + 0.1))
            pending_since = None
        await asyncio.sleep(0)
    soak_trace.emit({"k": "deadline", "t": time.time()})
    await cache.flush_pending()
    report["pending_at_exit"] = cache.stats()["pending_invalidations"]
    if pending_since is not None:
        # still undelivered when the process leaves: lost; entries expire by their TTL
        report["pending"].append(
            (pending_since, float("inf") if report["pending_at_exit"] else time.time())
        )
    stats = cache.stats()
    report["hits"] = stats["totals"]["hits"]
    report["cache_errors"] = stats["totals"]["errors"]
    report["epoch_moves"] = stats["epoch_moves"]
    report["pending_invalidations"] = stats["pending_invalidations"]
    await cache.disconnect()
    soak_trace.emit({"k": "disconnected", "t": time.time()})
    soak_trace.close()
    await engine.dispose()
    await truth_engine.dispose()
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m integration.soak_worker")
    parser.add_argument("--pg", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--users", type=int, required=True)
    report = asyncio.run(run(parser.parse_args(argv)))
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
