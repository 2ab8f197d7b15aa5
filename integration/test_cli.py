"""The command line against the real Redis: an invalidation from another OS process makes a cached
entry stale, and what it cannot do it reports with a non-zero exit status."""

from __future__ import annotations

import asyncio
import json

from tests.models import Seat, User
from tests.test_cli import run_cli


async def seed_and_cache(sessions, sql) -> None:
    async with sessions() as s:
        s.add_all([User(id=42, name="before"), Seat(row="07", number=3)])
        await s.commit()
    await read_user(sessions)
    await read_seat(sessions)
    before = sql.selects
    await read_user(sessions)
    await read_seat(sessions)
    assert sql.selects == before, "both reads must be cached before the CLI runs"


async def read_user(sessions) -> str:
    async with sessions() as s:
        user = await s.get(User, 42)
        return user.name


async def read_seat(sessions) -> None:
    async with sessions() as s:
        await s.get(Seat, ("07", 3))


async def cli(*args: str):
    return await asyncio.to_thread(run_cli, *args)


async def test_cli_invalidate_of_a_model_path_makes_the_cached_row_stale(
    make_cache, stack, sessions, sql
):
    cache = await make_cache()
    await seed_and_cache(sessions, sql)
    prefix = cache.config.prefix
    done = await cli("invalidate", "tests.models.User", "--pk", "42", "--backend", stack.backend,
                     "--prefix", prefix)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "invalidated tests.models.User rows [42]" in done.stdout
    before = sql.selects
    await read_user(sessions)
    assert sql.selects == before + 1, "the CLI's invalidation did not reach the cached entry"


async def test_cli_invalidate_of_a_table_name_with_a_string_key(make_cache, stack, sessions, sql):
    cache = await make_cache()
    await seed_and_cache(sessions, sql)
    # no models imported in the CLI: "07" is kept as text (and also tried as 7), 3 also as "3"
    done = await cli("--backend", stack.backend, "--prefix", cache.config.prefix,
                     "invalidate", "seats", "--pk", "07,3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "column types unknown" in done.stdout
    before = sql.selects
    await read_seat(sessions)
    assert sql.selects == before + 1
    await read_user(sessions)
    assert sql.selects == before + 1, "another table's entry was evicted"


async def test_cli_unknown_table_exits_2_with_a_suggestion_and_leaves_entries(
    make_cache, stack, sessions, sql
):
    cache = await make_cache()
    await seed_and_cache(sessions, sql)
    done = await cli("--backend", stack.backend, "--prefix", cache.config.prefix,
                     "invalidate", "user")  # fmt: skip
    assert done.returncode == 2
    assert "unknown table or model 'user'" in done.stderr and "did you mean 'users'" in done.stderr
    assert "Traceback" not in done.stderr


async def test_cli_prefix_nobody_used_exits_2_naming_the_prefixes_found(
    make_cache, stack, sessions, sql
):
    cache = await make_cache()
    await seed_and_cache(sessions, sql)
    done = await cli("--backend", stack.backend, "--prefix", "nobody-uses-this",
                     "invalidate", "users")  # fmt: skip
    assert done.returncode == 2
    assert "nothing to invalidate" in done.stderr and cache.config.prefix in done.stderr


async def test_cli_invalidate_all_and_stats_are_shared(make_cache, stack, sessions, sql):
    cache = await make_cache()
    await seed_and_cache(sessions, sql)
    stats = await cli("stats", "--backend", stack.backend, "--prefix", cache.config.prefix)
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["scope"].startswith("shared") and data["entries"] >= 2
    done = await cli("invalidate-all", "--backend", stack.backend, "--prefix", cache.config.prefix)
    assert done.returncode == 0, done.stderr
    before = sql.selects
    await read_user(sessions)
    await read_seat(sessions)
    assert sql.selects == before + 2
