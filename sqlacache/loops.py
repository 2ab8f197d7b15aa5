"""Per-event-loop state: asyncio connections, pools, semaphores and tasks belong to one loop.

A process may run several loops, one after another (`asyncio.run()` twice, a loop per test) or at
once in threads. `LoopLocal` gives each loop its own copy, made on first use, and forgets the
copies of loops that closed or were collected, so nothing made for a dead loop is ever used again.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """One `T` per event loop, made by `factory()` from inside that loop, held weakly by loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        # The hot path asks for the same loop's value again and again: one comparison instead of a
        # weak-key lookup. The loop is held weakly here too, and the value forgotten with it.
        self._last: tuple[weakref.ReferenceType[asyncio.AbstractEventLoop], T] | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        """The running loop's value, made now if this loop has none (raises outside a loop)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        with self._lock:
            value = self._values.get(loop)
            if value is None:
                self._forget_closed()
                value = self._factory()
                self._values[loop] = value
            self._last = (weakref.ref(loop, self._forget_last), value)
        return value

    def current(self) -> T | None:
        """The running loop's value if it has one (None outside a loop or before first use)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self._values.get(loop)

    def values(self) -> list[T]:
        """Every live loop's value, left in place (for reading what they learnt)."""
        with self._lock:
            return [value for loop, value in list(self._values.items()) if not loop.is_closed()]

    def take_all(self) -> list[tuple[asyncio.AbstractEventLoop, T]]:
        """Remove and return every loop's value (for closing them)."""
        with self._lock:
            items = list(self._values.items())
            self._values.clear()
            self._last = None
        return items

    def __len__(self) -> int:
        return sum(1 for loop in list(self._values) if not loop.is_closed())

    def _forget_closed(self) -> None:
        for closed in [loop for loop in list(self._values) if loop.is_closed()]:
            self._values.pop(closed, None)
        last = self._last
        if last is not None:
            loop = last[0]()
            if loop is None or loop.is_closed():
                self._last = None

    def _forget_last(self, ref: weakref.ReferenceType[asyncio.AbstractEventLoop]) -> None:
        last = self._last
        if last is not None and last[0] is ref:
            self._last = None
