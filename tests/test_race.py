"""The fill race (SPEC C6), forced deterministically.

A reader misses, runs its query, and is paused between reading the database and storing its
result while a writer commits. The entry it then stores must never be served.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.util import await_only

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
