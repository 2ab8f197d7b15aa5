"""Bridging SQLAlchemy's sync event hooks and asyncio I/O.

SQLAlchemy runs an `AsyncSession`'s work inside a greenlet, where `await_` suspends on a coroutine
without the hook itself being async; outside it, the stores use their synchronous clients.
"""

from __future__ import annotations

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
