"""The in-process tier's bars, in one process: P2L (local `get` hit vs the floor, 0 round trips)
and P6 (throughput at 50 tasks, 95 % reads on the hot rows, with the tier, vs the floor).

    .venv/bin/python bench/local_tier.py      # SQLACACHE_BENCH_PG / SQLACACHE_BENCH_REDIS

Variants are sampled in interleaved rounds (see harness.interleave), so their ratios hold on a
noisy machine. P8 (propagation to another process) is measured with real processes by
integration/test_local_tier.py, which prints p50/p99.
"""

from __future__ import annotations

import asyncio
import os

from harness import (
    HOT_ROWS,
    FloorCache,
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
from run import throughput_ops, warm_hot_rows

import sqlacache

PG_URL = os.environ.get(
    "SQLACACHE_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/h_bench"
)
REDIS_URL = os.environ.get("SQLACACHE_BENCH_REDIS", "redis://127.0.0.1:6379/12")


async def main() -> None:
    plain = make_engine(PG_URL)
    await create_schema(plain)
    floor = FloorCache()
    floor.install()
    sql = SQLCounter()
    local_engine, redis_engine = make_engine(PG_URL), make_engine(PG_URL)
    local = sqlacache.configure(REDIS_URL, {"*": {"timeout": 600}}, prefix="bl", local=True)
    remote = sqlacache.configure(REDIS_URL, {"*": {"timeout": 600}}, prefix="br")
    await local.bind(local_engine)
    await remote.bind(redis_engine)
    for engine in (plain, local_engine, redis_engine):
        sql.listen(engine)
    tier = local.local_tier
    assert tier is not None
    while not tier.mirror.fresh():
        await asyncio.sleep(0.01)
    sessions = {
        "local": sessions_for(local_engine),
        "redis": sessions_for(redis_engine),
        "floor": floor_sessions(plain),
    }
    keys = list(range(1, 21))
    hot = cycle(keys)

    def get(name: str):  # type: ignore[no-untyped-def]
        made = sessions[name]

        async def op(number: int) -> None:
            async with made() as session:
                await session.get(User, hot(number))

        return op

    variants = {name: get(name) for name in sessions}
    for _ in range(3):  # fill, then a Redis hit makes the entries local
        for op in variants.values():
            for n in range(len(keys)):
                await op(n)
        await local.flush_pending()
        await remote.flush_pending()
    hits_before = tier.hits
    samples = await interleave(variants, 20, 20, sql)
    local_hits = tier.hits - hits_before
    floor_us = samples["floor"].median()
    print("P2L get hit (median µs):")
    for name, sample in samples.items():
        print(
            f"  {name:6} {sample.median():8.1f}  = {sample.median() / floor_us:5.2f} x floor"
            f"   selects/op {sample.selects / len(sample.micros):.2f}"
        )
    print(f"  local hits: {local_hits} of {len(samples['local'].micros)} local-variant reads")

    print("P6 throughput, 95 % get / 5 % commit on", HOT_ROWS, "hot rows:")
    tp = {
        "local": throughput_ops(sessions["local"], sessions["local"]),
        "floor": throughput_ops(sessions["floor"], sessions_for(plain)),
    }
    await warm_hot_rows(sessions["local"])
    await local.flush_pending()
    await warm_hot_rows(sessions["local"])
    for pk in range(1, HOT_ROWS + 1):
        await tp["floor"][0](pk)
    totals: dict[tuple[int, str], list[float]] = {}
    for repeat in range(3):
        for tasks in (1, 50):
            for name in ["local", "floor"] if repeat % 2 == 0 else ["floor", "local"]:
                read, write = tp[name]
                ops, seconds = await throughput(read, write, tasks, 2.0, repeat)
                total = totals.setdefault((tasks, name), [0.0, 0.0])
                total[0] += ops
                total[1] += seconds
    for tasks in (1, 50):
        rates = {name: totals[(tasks, name)][0] / totals[(tasks, name)][1] for name in tp}
        print(
            f"  {tasks:2} tasks: local {rates['local']:8.0f} ops/s, floor {rates['floor']:8.0f}"
            f" ops/s = {rates['local'] / rates['floor']:.2f} x floor"
        )
    print("local tier:", local.stats()["local"])
    floor.remove()
    for cache in (local, remote):
        await cache.invalidate_all()
        await cache.disconnect()
    for engine in (plain, local_engine, redis_engine):
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
