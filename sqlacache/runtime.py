"""What a bound cache is made of at run time: the store behind its breaker, the bound databases,
the background tasks. Built by the manager at the first `bind()`, dropped by `disconnect()`; the
read and write paths receive it instead of reaching back into the manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import CacheConfig
from .database import Databases
from .keys import Namespace
from .resilience import GuardedStore
from .serialize import Serializer
from .stats import Stats

if TYPE_CHECKING:
    from .local_tier import LocalTier


class Background:
    """Tasks the cache runs on its own (fills, deliveries), awaited by `flush_pending()` and
    `disconnect()`. A task belongs to its event loop: only the running loop's are awaited
    (another thread's loop cannot be awaited from this one, and a closed loop's never finish)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def here(self) -> list[asyncio.Task[None]]:
        loop = asyncio.get_running_loop()
        tasks = list(self.tasks)  # one C-level copy: other loops' threads add and discard
        for task in tasks:
            if task.get_loop().is_closed():
                self.tasks.discard(task)
        return [task for task in tasks if task.get_loop() is loop]

    async def drain(self) -> None:
        tasks = self.here()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, timeout: float) -> None:
        tasks = self.here()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


@dataclass
class Runtime:
    config: CacheConfig
    namespace: Namespace
    stats: Stats
    serializer: Serializer
    store: GuardedStore
    instance_id: int
    databases: Databases = field(default_factory=Databases)
    background: Background = field(default_factory=Background)
    #: the in-process tier (`local_tier`), where configured
    local: LocalTier | None = None

    @property
    def tx_key(self) -> tuple[str, int]:
        """Where this cache keeps its transaction records in `session.info` / `connection.info`
        (per cache: several caches may share an engine)."""
        return ("sqlacache.tx", self.instance_id)
