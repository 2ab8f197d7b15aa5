"""Stampede protection: concurrent misses of one entry run one database query.

In one process, the first miss of a (key, stamp) leads; identical misses wait for its snapshot
instead of querying. Misses only join when they captured the same stamp, so a follower never takes a
result read under older versions than its own. Asyncio tasks wait on a future (through SQLAlchemy's
greenlet); threads of a sync application wait on an event.

A finished flight is kept for a moment: a miss whose fetch was answered before the leader stored
(typical when many requests open Redis connections at once) still carries the same stamp, and the
leader's result is exactly as valid for it. Any write in between changes the stamp, so it cannot join.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Any

from ._greenlet import await_, in_greenlet

FlightKey = tuple[str, tuple[bytes | None, ...]]
RECENT_SECONDS = 2.0
RECENT_MAX = 1000


class _ThreadFlight:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._snapshot: Any = None

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, snapshot: Any) -> None:
        self._snapshot = snapshot
        self._event.set()

    def wait(self, timeout: float) -> Any:
        return self._snapshot if self._event.wait(timeout) else None


class Flights:
    """The in-flight misses of one cache, keyed by entry key and stamp."""

    def __init__(self, wait_timeout: float) -> None:
        self.wait_timeout = wait_timeout
        self._flights: dict[tuple[FlightKey, asyncio.AbstractEventLoop | None], Any] = {}
        self._recent: OrderedDict[FlightKey, tuple[Any, float]] = OrderedDict()

    def lead_or_join(self, key: FlightKey) -> tuple[Any, bool]:
        """The flight for `key` and whether the caller leads it (and must `finish` it)."""
        is_async = in_greenlet()
        recent = self._recent.get(key)
        if recent is not None and time.monotonic() - recent[1] < RECENT_SECONDS:
            done = _ThreadFlight()
            done.set_result(recent[0])
            return done, False
        # an asyncio follower can only wait on a future of its own event loop
        loop = asyncio.get_running_loop() if is_async else None
        mine: Any = loop.create_future() if loop is not None else _ThreadFlight()
        flight = self._flights.setdefault((key, loop), mine)
        return flight, flight is mine

    def wait(self, flight: Any) -> Any:
        """The leader's snapshot, or None if it had none (the caller then queries itself)."""
        if isinstance(flight, _ThreadFlight):
            return flight.wait(self.wait_timeout)
        try:
            return await_(asyncio.shield(flight))
        except Exception:
            return None

    def finish(self, key: FlightKey, flight: Any, snapshot: Any) -> None:
        self._flights.pop(
            (key, None if isinstance(flight, _ThreadFlight) else flight.get_loop()), None
        )
        if not flight.done():
            flight.set_result(snapshot)
        if snapshot is not None:
            self._recent[key] = (snapshot, time.monotonic())
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_MAX:
                self._recent.popitem(last=False)
