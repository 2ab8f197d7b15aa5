"""Where a cache hit (or miss, or commit) spends its time: cProfile or pyinstrument, by package.

    .venv/bin/python bench/profile_hits.py                       # get + fetch100 hits, mem and redis
    .venv/bin/python bench/profile_hits.py --backend redis --workload get --tool pyinstrument
    .venv/bin/python bench/profile_hits.py --backend redis --kind commit

Not part of `make bench`: profilers slow every Python call down, so only the shares and the
ranking mean anything here, never the absolute µs. pyinstrument is optional (pip install it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from harness import (
    FloorCache,
    create_schema,
    floor_sessions,
    make_engine,
    sessions_for,
)
from redis_meter import PREFIX, Meter
from run import COMMIT_PKS, REDIS_URL, WORKLOADS, Sessions, committer, database_url

import sqlacache


def package_of(path: str, name: str) -> str:
    if path == "~":  # a C function: name it by what it is
        if "json" in name or "loads" in name or "dumps" in name:
            return "json/C"
        return "builtins"
    for package in ("sqlacache", "sqlalchemy", "redis", "greenlet"):
        if f"/{package}/" in path:
            return package
    if "/asyncio/" in path:
        return "asyncio"
    if "/json/" in path:
        return "json/C"
    if "bench/" in path:
        return "bench"
    return "stdlib/other"


def report_cprofile(profile: cProfile.Profile, ops: int, top: int) -> None:
    stats = pstats.Stats(profile)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    by_package: dict[str, float] = defaultdict(float)
    total = 0.0
    rows = []
    for (path, line, name), (_cc, calls, own, cumulative, _callers) in raw.items():
        package = package_of(path, name)
        by_package[package] += own
        total += own
        short = path.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append((package, f"{short}:{line}({name})", calls, own, cumulative))
    print(f"  self time by package ({total / ops * 1e6:.0f} µs/op under the profiler):")
    for package, own in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"    {package:<14}{own / total:>6.1%}  {own / ops * 1e6:>8.1f} µs/op")
    print(f"  top {top} cumulative inside sqlacache (µs/op; calls/op):")
    ours = sorted((r for r in rows if r[0] == "sqlacache"), key=lambda r: -r[4])
    for _package, where, calls, own, cumulative in ours[:top]:
        print(
            f"    {cumulative / ops * 1e6:>8.1f} cum {own / ops * 1e6:>7.1f} self"
            f" {calls / ops:>6.1f}x  {where}"
        )
    print(f"  top {top} self time anywhere (µs/op; calls/op):")
    for package, where, calls, own, _cumulative in sorted(rows, key=lambda r: -r[3])[:top]:
        print(f"    {own / ops * 1e6:>8.1f} self {calls / ops:>6.1f}x  [{package}] {where}")


async def profile_one(
    label: str,
    op: Callable[[int], Awaitable[None]],
    ops: int,
    tool: str,
    top: int,
) -> None:
    # numbers never repeat: a miss needs a new key, a commit a new value
    for number in range(200):  # warm SQLAlchemy's compiled cache, the plans, the pools
        await op(number)
    start = time.perf_counter()
    for number in range(200, 400):
        await op(number)
    plain = (time.perf_counter() - start) / 200 * 1e6
    print(f"\n== {label}: {plain:.0f} µs/op without the profiler; profiling {ops} ops")
    if tool == "pyinstrument":
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001, async_mode="disabled")
        profiler.start()
        for number in range(400, 400 + ops):
            await op(number)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False, short_mode=True))
        return
    profile = cProfile.Profile()
    profile.enable()
    for number in range(400, 400 + ops):
        await op(number)
    profile.disable()
    report_cprofile(profile, ops, top)


async def main(args: argparse.Namespace) -> None:
    db_url, _label, version = await database_url([])
    plural = {"hit": "hits", "miss": "misses", "commit": "commits"}[args.kind]
    print(f"profiling {plural} on {version}; {args.ops} ops per profile, tool {args.tool}")
    plain_engine = make_engine(db_url)
    await create_schema(plain_engine)
    floor = FloorCache()
    floor.install()
    floor_made = floor_sessions(plain_engine)
    workloads = [w for w in WORKLOADS if args.workload in ("all", w.name)]
    backends = {"mem": "mem://", "redis": REDIS_URL}
    chosen = list(backends) if args.backend == "both" else [args.backend]
    try:
        for workload in workloads:

            def hits(sessions: Sessions, workload: Any = workload) -> Any:
                keys = workload.hit_keys
                return workload.op(sessions, lambda n: keys[n % len(keys)])

            def measured(sessions: Sessions, workload: Any = workload) -> Any:
                if args.kind == "miss":
                    return workload.op(sessions, lambda _n: workload.fresh())
                if args.kind == "commit":
                    return committer(sessions, COMMIT_PKS[0])
                return hits(sessions)

            if args.floor and args.kind == "hit":
                await profile_one(
                    f"floor {workload.name}", hits(floor_made), args.ops, args.tool, args.top
                )
            for name in chosen:
                meter = Meter(REDIS_URL) if name == "redis" else None
                if meter is not None:
                    await meter.delete_bench_keys()
                engine = make_engine(db_url)
                cache = sqlacache.configure(
                    backend=backends[name], models={"*": {"timeout": 600}}, prefix=PREFIX
                )
                await cache.bind(engine)
                try:
                    await profile_one(
                        f"{'commit' if args.kind == 'commit' else workload.name} {args.kind},"
                        f" {name}://",
                        measured(sessions_for(engine)),
                        args.ops,
                        args.tool,
                        args.top,
                    )
                    totals = cache.stats()["totals"]
                    print(f"  cache counted: {totals}")
                finally:
                    await cache.disconnect()
                    await engine.dispose()
                    if meter is not None:
                        await meter.delete_bench_keys()
                        await meter.aclose()
    finally:
        floor.remove()
        await plain_engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="profile sqlacache cache hits")
    parser.add_argument("--backend", choices=("mem", "redis", "both"), default="both")
    parser.add_argument(
        "--workload", choices=("get", "fetch20", "fetch100", "count", "all"), default="get"
    )
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--tool", choices=("cprofile", "pyinstrument"), default="cprofile")
    parser.add_argument("--floor", action="store_true", help="profile the floor session too")
    parser.add_argument(
        "--kind", choices=("hit", "miss", "commit"), default="hit", help="what to profile"
    )
    asyncio.run(main(parser.parse_args()))
