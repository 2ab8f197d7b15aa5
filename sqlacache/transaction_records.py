"""The records of write tracking: per connection transaction, what it wrote in a stack of
savepoint frames (`ConnectionTx`); per session, what its transaction did that its reads must heed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from .database import Database
from .writes import WriteSet


class ConnectionTx:
    """The writes of one connection's current (outermost) transaction."""

    __slots__ = (
        "announced",
        "announcing",
        "committed",
        "db",
        "flush_dml",
        "frames",
        "leased",
        "owner",
    )

    def __init__(self, db: Database) -> None:
        self.db = db
        self.frames: list[WriteSet] = [WriteSet()]
        self.announced = WriteSet()
        self.announcing: list[Any] = []  # announcements in flight: `complete` waits for them
        self.leased: set[str] = set()  # lease keys held
        self.flush_dml: set[str] = set()
        self.committed = False
        self.owner: SessionTracker | None = None

    @property
    def top(self) -> WriteSet:
        return self.frames[-1]

    def merged(self) -> WriteSet:
        total = WriteSet()
        for frame in self.frames:
            total.merge(frame)
        return total

    def has_writes(self) -> bool:
        return any(self.frames) or bool(self.leased)

    # -- savepoint frames: a savepoint's writes are its own until it is released -----------------

    def begin_savepoint(self) -> None:
        self.frames.append(WriteSet())

    def release_savepoint(self) -> None:
        if len(self.frames) > 1:
            released = self.frames.pop()
            self.top.merge(released)

    def rollback_savepoint(self) -> None:
        if len(self.frames) > 1:
            self.frames.pop()  # its writes are undone; its leases stay until the transaction ends


class SessionTracker:
    """What a session's current transaction did that matters to its reads."""

    __slots__ = (
        "connections",
        "flushing",
        "has_sql",
        "raw_sql",
        "snapshot_after_write",
        "snapshot_tx",
        "written",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.written: set[str] = set()
        self.raw_sql = False
        self.flushing = False
        self.has_sql = False
        #: reads see one snapshot from the transaction's first statement on
        self.snapshot_tx = False
        #: reads see one snapshot once the transaction has written (sqlite's legacy driver mode)
        self.snapshot_after_write = False
        self.connections: list[Connection] = []

    @property
    def reads_a_snapshot(self) -> bool:
        """True once this transaction's reads may be older than the cache's current stamps."""
        if self.snapshot_tx:
            return self.has_sql
        return self.snapshot_after_write and bool(self.written)
