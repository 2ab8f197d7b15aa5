"""What a bound cache is made of at run time: the store behind its breaker, the bound databases,
the background tasks. Built by the manager at the first `bind()`, dropped by `disconnect()`; the
read and write paths receive it instead of reaching back into the manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from .config import CacheConfig
from .database import Database
from .keys import Namespace
from .resilience import GuardedStore
from .serialize import Serializer
from .stats import Stats


class Background:
    """Tasks the cache runs on its own (fills, deliveries), awaited by `flush_pending()` and
    `disconnect()`."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def wait(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


class Databases:
    """The bound engines, by connection pool (an option engine shares its engine's pool)."""

    def __init__(self) -> None:
        self._by_pool: dict[Pool, Database] = {}

    def __contains__(self, engine: Engine) -> bool:
        return engine.pool in self._by_pool

    def add(self, database: Database) -> None:
        self._by_pool[database.engine.pool] = database

    def for_engine(self, engine: Engine) -> Database | None:
        return self._by_pool.get(engine.pool)

    def for_bind(self, bind: Any) -> Database | None:
        """The database of an Engine or Connection, if it is bound to this cache."""
        engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
        return None if engine is None else self._by_pool.get(engine.pool)

    def all(self) -> list[Database]:
        return list(self._by_pool.values())

    def identities(self) -> list[str]:
        return sorted({db.identity for db in self._by_pool.values()})

    def clear(self) -> None:
        for database in self._by_pool.values():
            database.plans.clear()
        self._by_pool.clear()


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

    @property
    def tx_key(self) -> tuple[str, int]:
        """Where this cache keeps its transaction records in `session.info` / `connection.info`
        (per cache: several caches may share an engine)."""
        return ("sqlacache.tx", self.instance_id)
