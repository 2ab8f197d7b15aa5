"""The fill race (a read racing a commit never stores a stale entry) across two OS processes sharing Redis."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from tests.models import User

ROOT = Path(__file__).resolve().parent.parent


async def test_a_stale_fill_from_another_process_is_never_served(
    stack, make_cache, engine, sessions
):
    cache = await make_cache()
    async with sessions() as s:
        s.add(User(id=1, name="old"))
        await s.commit()
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "integration" / "race_reader.py"),
        stack.db_url,
        stack.backend,
        cache.config.prefix,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert reader.stdin is not None and reader.stdout is not None
    line = await asyncio.wait_for(reader.stdout.readline(), 30)
    assert line.strip() == b"READ"  # the other process read "old" and has not stored it yet
    async with AsyncSession(engine) as s:
        (await s.get(User, 1)).name = "new"
        await s.commit()
    reader.stdin.write(b"go\n")
    await reader.stdin.drain()
    out = (await asyncio.wait_for(reader.stdout.readline(), 30)).split()
    assert await asyncio.wait_for(reader.wait(), 30) == 0
    assert out[0] == b"STORED" and int(out[1]) == 1 and out[2] == b"old"
    async with AsyncSession(engine) as s:
        assert (await s.get(User, 1)).name == "new"
