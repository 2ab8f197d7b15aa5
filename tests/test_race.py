"""The fill race (a read racing a commit never stores a stale entry), forced deterministically.

A reader misses, runs its query, and is paused between reading the database and storing its
result while a writer commits. The entry it then stores must never be served.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.util import await_only

from tests.fixtures import create_engine_for
from tests.models import User


class Gate:
    """Pauses the next SELECT on a table right after the database answered it."""

    def __init__(self, engine: Any, table: str) -> None:
        self.table = table
        self.armed = False
        self.paused = asyncio.Event()
        self.released = asyncio.Event()
        event.listen(engine.sync_engine, "after_cursor_execute", self._after)

    def arm(self) -> None:
        self.armed = True

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if (
            self.armed
            and statement.lstrip().upper().startswith("SELECT")
            and self.table in statement
        ):
            self.armed = False
            self.paused.set()
            await_only(self.released.wait())  # we are in SQLAlchemy's greenlet


@pytest.fixture
async def user(sessions):
    async with sessions() as s:
        s.add_all([User(id=1, name="old"), User(id=2, name="other")])
        await s.commit()


async def name_of(sessions, pk):
    async with sessions() as s:
        return (await s.get(User, pk)).name


async def names(sessions):
    async with sessions() as s:
        return [u.name for u in (await s.execute(select(User).order_by(User.id))).scalars()]


async def rename(sessions, pk, name):
    async with sessions() as s:
        (await s.get(User, pk, execution_options={"cache": False})).name = name
        await s.commit()


def stores(cache, op):
    return cache.stats()["models"]["tests.models.User"][op]["stores"]


@pytest.mark.parametrize("op", ["get", "fetch"])
async def test_a_result_read_before_a_commit_and_stored_after_it_is_never_served(
    cache, user, sessions, engine, op
):
    read = (lambda: name_of(sessions, 1)) if op == "get" else (lambda: names(sessions))
    gate = Gate(engine, "users")
    gate.arm()
    reader = asyncio.create_task(read())
    await gate.paused.wait()  # the reader has the old row and has not stored it yet
    await rename(sessions, 1, "new")
    gate.released.set()
    stale = await reader
    assert stale in ("old", ["old", "other"])  # it read before the commit: correct for it
    await cache.flush_pending()  # entries are written in the background
    assert stores(cache, op) >= 1  # and it did store an entry...
    assert await read() in ("new", ["new", "other"])  # ...which is never served


async def test_no_fill_while_a_writer_holds_its_lease(cache, user, sessions):
    async with sessions() as writer:
        (await writer.get(User, 1, execution_options={"cache": False})).name = "new"
        await writer.flush()  # first flush: versions bumped, lease taken...
        await cache.flush_pending()  # ...by a delivery that overlaps the transaction
        assert await name_of(sessions, 1) == "old"  # committed data, read from the database
        before = stores(cache, "get")
        assert await name_of(sessions, 1) == "old"
        assert stores(cache, "get") == before  # nothing filled while the lease is held
        await writer.commit()
    assert await name_of(sessions, 1) == "new"


async def test_concurrent_misses_with_a_writer_in_between_converge(cache, user, sessions, engine):
    gate = Gate(engine, "users")
    gate.arm()
    first = asyncio.create_task(name_of(sessions, 1))
    await gate.paused.wait()
    await rename(sessions, 1, "v2")
    second = await name_of(sessions, 1)  # starts after the commit: must see it
    gate.released.set()
    assert await first == "old"
    assert second == "v2"
    assert await name_of(sessions, 1) == "v2"


@pytest.mark.parametrize("op", ["get", "fetch"])
async def test_a_reader_that_sees_a_commit_in_the_database_never_gets_the_older_row_cached(
    cache, user, sessions, engine, stack, op
):
    """The announcement (bump + lease at flush) lands before the COMMIT is sent: once another
    process can see the commit in the database, no entry filled before it validates any more.

    Under asyncio the announcement runs in a task of its own. Here it is held, if the COMMIT went
    out before it, until the database has the commit; a reader then reads the row from the
    database and through the cache. (On mem:// every delivery is synchronous.)
    """
    read = (lambda: name_of(sessions, 1)) if op == "get" else (lambda: names(sessions))
    assert await read() in ("old", ["old", "other"])
    await cache.flush_pending()  # the entry landed: the next read is a hit
    truth_engine = await create_engine_for(stack)  # plain SQL, as another process reads
    store = cache._bound.runtime.store.raw
    announce = store.bump_async
    commit_sent = False
    held, release = asyncio.Event(), asyncio.Event()

    def committing(conn: Any) -> None:  # after the cache's own listener, just before COMMIT
        nonlocal commit_sent
        commit_sent = True

    async def database_name(lock: bool) -> str:
        query = "SELECT name FROM users WHERE id = 1" + (" FOR SHARE" if lock else "")
        async with truth_engine.connect() as conn:
            return str((await conn.execute(text(query))).scalar_one())

    async def late_announcement(bump: Any, *args: Any) -> None:
        if bump.acquire and commit_sent:
            # the COMMIT is on its way: this waits for the row lock, i.e. for the database
            # to have committed, then holds the announcement while the reader reads
            await database_name(lock=True)
            held.set()
            await release.wait()
        await announce(bump, *args)

    store.bump_async = late_announcement
    event.listen(engine.sync_engine, "commit", committing)
    try:
        writer = asyncio.create_task(rename(sessions, 1, "new"))
        holding = asyncio.create_task(held.wait())
        await asyncio.wait({writer, holding}, return_when=asyncio.FIRST_COMPLETED)
        in_database = await database_name(lock=False)
        cached = await read()
        release.set()
        await writer
    finally:
        release.set()
        holding.cancel()
        event.remove(engine.sync_engine, "commit", committing)
        del store.bump_async
        await truth_engine.dispose()
    assert in_database == "new"
    assert cached in ("new", ["new", "other"])
