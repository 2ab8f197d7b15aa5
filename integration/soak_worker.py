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
    from tests.models import Order, User

    engine = create_async_engine(args.pg, pool_size=3)
    truth_engine = create_async_engine(args.pg, pool_size=2)
    cache = sqlacache.configure(
        backend=args.backend, models={"*": {"timeout": 300}}, prefix=args.prefix
    )
    await cache.bind(engine)
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
                async with sessions() as s:
                    if rng.random() < 0.5:
                        (await s.get(User, pk)).name = f"{pk}:{seqs[pk]}"
                    else:
                        stmt = update(User).where(User.id == pk).values(name=f"{pk}:{seqs[pk]}")
                        await s.execute(stmt)
                    s.add(Order(id=order_id, user_id=pk, total=seqs[pk]))
                    await s.commit()
                report["orders"].append(order_id)
                report["writes"] += 1
            elif roll < 0.65:
                pk = rng.randint(1, args.users)
                floor = seq_of((await truth_names())[pk])
                async with sessions() as s:
                    name = (await s.get(User, pk)).name
                if seq_of(name) < floor:
                    stale("get", f"user {pk}: {name} after the database had {pk}:{floor}")
                report["reads_checked"] += 1
            elif roll < 0.85:
                truth = await truth_names()
                async with sessions() as s:
                    stmt = select(User).where(User.id <= 10).order_by(User.id)
                    rows = [(u.id, u.name) for u in (await s.execute(stmt)).scalars()]
                for pk, name in rows:
                    if seq_of(name) < seq_of(truth[pk]):
                        stale("fetch", f"user {pk}: {name} after the database had {truth[pk]}")
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
