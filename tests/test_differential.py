"""A randomized differential test of the whole contract.

A seeded random sequence of ORM, bulk and Core writes (with rollbacks, savepoints, database
cascades and concurrent readers) runs with the cache on; every cached read is compared with the
same read uncached. Zero mismatches is the only pass. The seed is printed and is part of every
failure message; replay with `SQLACACHE_DIFF_SEED=<seed>` (and `SQLACACHE_DIFF_OPS=<n>` to stop
right after the failing step). Runs on mem:// + SQLite here and on Redis + PostgreSQL from
integration/.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.difftools import Runner, seed_data
from tests.fixtures import create_engine_for


def _seed() -> int:
    given = os.environ.get("SQLACACHE_DIFF_SEED")
    return int(given) if given else random.SystemRandom().randrange(2**32)


@pytest.mark.slow
@pytest.mark.parametrize("verify", [0.0, 1.0], ids=["cached", "every_hit_verified"])
async def test_cached_reads_always_equal_uncached_reads(
    stack, engine, sessions, make_cache, verify
):
    """With `verify=1.0` every hit is also checked by the cache itself against the database:
    the verification mode must report no mismatch where the differential comparison sees none."""
    seed = _seed()
    steps = int(os.environ.get("SQLACACHE_DIFF_OPS", "2000"))
    print(
        f"\nsqlacache differential test: stack={stack.name} seed={seed} steps={steps} "
        f"verify={verify}"
    )
    # the uncached side: a second engine on the same database that no cache is bound to
    truth_engine = await create_engine_for(stack)
    try:
        await seed_data(truth_engine, random.Random(seed))
        cache = await make_cache({"*": {"timeout": 300}}, verify=verify)
        runner = Runner(seed, stack.name, sessions, engine, truth_engine)
        started = time.monotonic()
        await runner.run(steps)
        elapsed = time.monotonic() - started
    finally:
        await truth_engine.dispose()
    stats = cache.stats()
    totals, checks = stats["totals"], stats["verify"]
    inconclusive = sum(
        counters["verify_inconclusive"]
        for ops in stats["models"].values()
        for counters in ops.values()
    )
    print(f"  {elapsed:.1f}s, {dict(runner.counts)}, cache totals {totals}")
    print(f"  verify counters {checks}, inconclusive {inconclusive}")
    assert checks["mismatches"] == 0, (seed, checks)
    if verify:
        assert checks["checked"] + inconclusive == totals["hits"], (seed, checks, totals)
    else:
        assert checks == {"checked": 0, "mismatches": 0}
    # the comparison proves nothing if the cache never served anything
    assert totals["hits"] >= runner.counts["comparisons"] // 10, (seed, totals)
    assert runner.counts["comparisons"] >= steps // 2
