"""What `bind()` assembles: the store behind its breaker, the read path, the write path and
recovery, wired together once, and the listeners that `disconnect()` removes."""

from __future__ import annotations

import functools

from sqlalchemy import event
from sqlalchemy.orm import Session

from .backends import make_store
from .config import CacheConfig
from .hooks import ReadPath
from .invalidation import Invalidator
from .keys import Namespace
from .redis_errors import classify_redis_error
from .resilience import Breaker, GuardedStore, Recovery
from .runtime import Runtime
from .serialize import Serializer
from .stats import Stats
from .tracking import WriteTracker


class Bound:
    """The parts of a bound cache, created together at the first `bind()`."""

    def __init__(
        self,
        config: CacheConfig,
        namespace: Namespace,
        stats: Stats,
        breaker: Breaker,
        instance_id: int,
    ) -> None:
        store = make_store(config.backend, config.operation_timeout)
        runtime = Runtime(
            config=config,
            namespace=namespace,
            stats=stats,
            serializer=Serializer(config.serializer, config.compress, config.secret),
            store=GuardedStore(store, breaker),
            instance_id=instance_id,
        )
        self.runtime = runtime
        spawn = runtime.background.spawn if store.shared else None
        self.invalidator = Invalidator(namespace, runtime.store, config, stats, spawn)
        self.tracker = WriteTracker(self.invalidator, runtime.databases.for_bind, runtime.tx_key)
        self.read_path = ReadPath(runtime)
        self.recovery = Recovery(store, self.invalidator, namespace, runtime.databases.identities)
        breaker.recover = self.recovery
        if store.shared:  # a Redis answer may say the configuration is wrong, not that it is down
            breaker.misconfiguration = functools.partial(
                classify_redis_error, url=config.backend.url, options=config.backend.options
            )
        event.listen(Session, "do_orm_execute", self.read_path.on_execute, retval=True)
        self.tracker.listen_globally()

    def unhook(self) -> None:
        if event.contains(Session, "do_orm_execute", self.read_path.on_execute):
            event.remove(Session, "do_orm_execute", self.read_path.on_execute)
        self.tracker.unlisten()
        self.runtime.databases.clear()
