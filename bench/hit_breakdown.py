"""Where a `redis://` `get` hit's time goes beyond floor + RTT, without a profiler's distortion.

    .venv/bin/python bench/hit_breakdown.py [--rounds 30 --batch 20]

Interleaved in the same rounds (as `make bench` samples): the floor, a `mem://` hit (the same
read path with no I/O), a `redis://` hit, the RTT reference (`redis.asyncio` GET of 800 bytes),
and the hit's own MGET of its keys sent three ways: on sqlacache's lean connection from plain
asyncio, the same from inside SQLAlchemy's greenlet (as the hit path sends it), and through
`redis.asyncio`'s `mget`. Then:

    mem hit - floor           what the read path costs in CPU (decide, decode, thaw)
    redis hit - mem hit       what reaching Redis costs the hit
    lean MGET (greenlet) - RTT  what the hit's round trip costs beyond the reference GET
    floor / mem hit then GET  the same work plus one GET in one operation: on a loaded machine
                              a round trip after CPU work costs far more than in a tight loop
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from harness import (
    FloorCache,
    SQLCounter,
    User,
    create_schema,
    floor_sessions,
    interleave,
    make_engine,
    sessions_for,
)
from redis_meter import PREFIX, Meter
from run import REDIS_URL, database_url
from sqlalchemy.util import greenlet_spawn

import sqlacache

KEYS = tuple(range(1, 51))


async def main(args: argparse.Namespace) -> None:
    db_url, _label, version = await database_url([])
    print(f"{version}; Redis {REDIS_URL}")
    plain = make_engine(db_url)
    await create_schema(plain, rows=1_000)
    floor = FloorCache()
    floor.install()
    meter = Meter(REDIS_URL)
    await meter.prepare()
    await meter.delete_bench_keys()
    mem_engine, red_engine = make_engine(db_url), make_engine(db_url)
    mem = sqlacache.configure(backend="mem://", models={"*": {"timeout": 600}}, prefix=PREFIX)
    red = sqlacache.configure(backend=REDIS_URL, models={"*": {"timeout": 600}}, prefix=PREFIX)
    await mem.bind(mem_engine)
    await red.bind(red_engine)
    raw: Any = red._bound.runtime.store.raw  # type: ignore[union-attr]
    seen: list[list[str]] = []
    original = raw.fetch

    def recording(keys: Any) -> Any:
        seen.append(list(keys))
        return original(keys)

    raw.fetch = recording
    sessions = {
        "floor": floor_sessions(plain),
        "mem hit": sessions_for(mem_engine),
        "redis hit": sessions_for(red_engine),
    }
    for made in sessions.values():
        for pk in KEYS:
            async with made() as session:
                await session.get(User, pk)
    await red.flush_pending()
    async with sessions["redis hit"]() as session:
        seen.clear()
        await session.get(User, KEYS[0])
    keys = seen[-1]
    raw.fetch = original
    print(f"a get hit's MGET: {len(keys)} keys, {sum(map(len, keys))} bytes of key names")

    def reader(made: Any) -> Any:
        async def op(number: int) -> None:
            async with made() as session:
                await session.get(User, KEYS[number % len(KEYS)])

        return op

    async def lean(_n: int) -> None:
        await raw._lean("MGET", *keys)

    async def lean_greenlet(_n: int) -> None:
        await greenlet_spawn(raw.fetch, keys)

    async def redispy(_n: int) -> None:
        await meter.client.mget(keys)

    floor_read = reader(sessions["floor"])

    async def floor_then_get(number: int) -> None:
        await floor_read(number)
        await meter.rtt(number)

    def burn(micros: float) -> None:
        import time

        end = time.perf_counter() + micros / 1e6
        while time.perf_counter() < end:
            pass

    async def cpu_then_get(number: int) -> None:
        burn(200)
        await meter.rtt(number)

    async def cpu_only(_n: int) -> None:
        burn(200)

    mem_read = reader(sessions["mem hit"])

    async def mem_then_get(number: int) -> None:
        await mem_read(number)
        await meter.rtt(number)

    variants = {name: reader(made) for name, made in sessions.items()}
    variants |= {
        "floor then GET": floor_then_get,
        "mem hit then GET": mem_then_get,
        "200 µs CPU": cpu_only,
        "200 µs CPU then GET": cpu_then_get,
    }
    variants |= {
        "RTT (GET 800 B)": meter.rtt,
        "lean MGET": lean,
        "lean MGET in greenlet": lean_greenlet,
        "redis.asyncio MGET": redispy,
    }
    samples = await interleave(variants, args.rounds, args.batch, SQLCounter(), red.flush_pending)
    m = {name: s.median() for name, s in samples.items()}
    print(f"\nmedians of {args.rounds} interleaved rounds x {args.batch} ops:")
    for name, value in m.items():
        print(f"  {name:<24}{value:>8.0f} µs")
    rtt = m["RTT (GET 800 B)"]
    print("\nbreakdown of the redis:// hit:")
    print(f"  floor                      {m['floor']:>8.0f} µs")
    print(f"  + read path CPU (mem-floor){m['mem hit'] - m['floor']:>+8.0f} µs")
    print(f"  + reaching Redis (red-mem) {m['redis hit'] - m['mem hit']:>+8.0f} µs")
    print(f"      of which RTT reference {rtt:>8.0f} µs")
    print(f"      lean MGET - RTT        {m['lean MGET'] - rtt:>+8.0f} µs")
    print(f"      greenlet + lean - RTT  {m['lean MGET in greenlet'] - rtt:>+8.0f} µs")
    print(f"  P2 ratio: {m['redis hit'] / (m['floor'] + rtt):.2f} x (floor+RTT) (bar <= 1.15)")
    print(f"  redis hit / (floor then GET):     {m['redis hit'] / m['floor then GET']:.2f}")
    print(f"  redis hit / (mem hit then GET):   {m['redis hit'] / m['mem hit then GET']:.2f}")
    await mem.disconnect()
    await red.disconnect()
    for engine in (plain, mem_engine, red_engine):
        await engine.dispose()
    floor.remove()
    await meter.delete_bench_keys()
    await meter.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=20)
    asyncio.run(main(parser.parse_args()))
