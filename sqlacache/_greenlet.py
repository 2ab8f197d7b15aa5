"""Bridging SQLAlchemy's sync event hooks and asyncio I/O.

SQLAlchemy runs an `AsyncSession`'s work inside a greenlet, where `await_` suspends on a coroutine
without the hook itself being async; outside it (a sync `Session`), the blocking clients are used.
`either` is the one place that chooses between the two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.util import concurrency

T = TypeVar("T")

await_: Callable[[Awaitable[Any]], Any] = (
    getattr(concurrency, "await_", None) or concurrency.await_only
)
greenlet_spawn = concurrency.greenlet_spawn


def in_greenlet() -> bool:
    """True inside SQLAlchemy's async greenlet, where `await_` may be called."""
    return bool(concurrency.in_greenlet())


def either(coroutine: Callable[[], Awaitable[T]], blocking: Callable[[], T]) -> T:
    """Run `coroutine()` awaited in SQLAlchemy's greenlet if we are in one, else `blocking()`."""
    if concurrency.in_greenlet():
        result: T = await_(coroutine())
        return result
    return blocking()


def sleep(seconds: float) -> None:
    """Pause this read: the event loop goes on inside the greenlet, a thread blocks outside."""
    either(lambda: asyncio.sleep(seconds), lambda: time.sleep(seconds))
