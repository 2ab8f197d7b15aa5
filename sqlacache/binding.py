"""What `bind()` assembles: the store behind its breaker, the read path, the write path and
recovery, wired together once, and the listeners that `disconnect()` removes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ._greenlet import greenlet_spawn
from .backends import Store, make_store
from .backends.cluster import ClusterStore
from .backends.cluster import check_config as check_cluster_mode
from .backends.redis import RedisStore
from .cashews_bridge import CashewsBridge, is_in_process
from .config import CacheConfig
from .database import Database, database_identity
from .errors import CacheUnavailable, ConfigError
from .hooks import ReadPath
from .invalidation import Invalidator
from .keys import Namespace
from .local_tier import TAGS, LocalTier
from .redis_errors import classify_redis_error
from .resilience import Breaker, GuardedStore, Recovery
from .runtime import Runtime
from .serialize import Serializer
from .session_tracking import SessionWriteTracker
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
        bind_namespace = getattr(store, "bind_namespace", None)
        if bind_namespace is not None:  # a cluster: which slot holds the versions
            bind_namespace(namespace.epoch_key)
        runtime = Runtime(
            config=config,
            namespace=namespace,
            stats=stats,
            serializer=Serializer(config.serializer, config.compress, config.secret),
            store=GuardedStore(store, breaker),
            instance_id=instance_id,
        )
        self.runtime = runtime
        self.breaker = breaker
        spawn = runtime.background.spawn if store.shared else None
        self.invalidator = Invalidator(namespace, runtime.store, config, stats, spawn)
        self.tracker = WriteTracker(self.invalidator, runtime.databases.for_bind, runtime.tx_key)
        self.session_tracker = SessionWriteTracker(self.tracker)
        self.read_path = ReadPath(runtime)
        self.recovery = Recovery(store, self.invalidator, namespace, runtime.databases.identities)
        breaker.recover = self.recovery
        breaker.urgent = lambda: self.invalidator.pending > 0
        if store.shared:  # a Redis answer may say the configuration is wrong, not that it is down
            breaker.misconfiguration = functools.partial(
                classify_redis_error, url=config.backend.url, options=config.backend.options
            )
        self.local_tier, self.bridge, self.tag_listener = _follow_invalidations(
            config, namespace, store, runtime.store, self.invalidator, breaker
        )
        runtime.local = self.local_tier
        event.listen(Session, "do_orm_execute", self.read_path.on_execute, retval=True)
        self.session_tracker.listen()

    def add_engine(self, engine: Engine, database_id: str | None) -> bool:
        """Listen to `engine`'s writes; False if it is bound already (or an engine sharing its
        pool, made by `execution_options()`)."""
        databases = self.runtime.databases
        if engine in databases or databases.for_pool(engine.pool):
            return False
        identity = database_id or database_identity(engine)
        database = Database(engine, identity, self.runtime.config.volatile_functions)
        databases.add(database, self.tracker.listen_engine(engine))
        return True

    def register_database(self, engine: Engine) -> None:
        """Record the database identity in the backend (for the command line) and open a few
        connections. Redis may be down: failures only feed the circuit breaker, which logs once
        per outage. A refusal that names a wrong setting unbinds the engine and raises."""
        databases, store = self.runtime.databases, self.runtime.store
        database = databases.for_pool(engine.pool)
        assert database is not None
        try:
            check_cluster_mode(store.raw)  # outside the breaker: a mistake must reach the caller
            store.warm_up()
            self.recovery.check_server(store.server_id())
            store.add_member(self.runtime.namespace.databases_key, database.identity)
        except ConfigError:
            databases.remove(engine)  # not bound: the caller must fix the configuration
            raise
        except CacheUnavailable as exc:
            cause = exc.__cause__
            problem = None if cause is None else self.breaker.misconfiguration(cause)
            if problem is not None:
                databases.remove(engine)
                raise ConfigError(problem) from cause

    async def flush_pending(self) -> None:
        """Wait for entries still being written, and deliver queued invalidations (and cashews
        tags) now if the backend answers."""
        await self.runtime.background.drain()
        if self.bridge is not None:  # cashews tags an outage kept
            await self.bridge.redeliver()
        if self.invalidator.pending:
            try:
                await greenlet_spawn(self.recovery)
            except Exception:
                return  # still unreachable: the breaker's probe keeps trying
            self.breaker.close()

    def unhook(self) -> None:
        if event.contains(Session, "do_orm_execute", self.read_path.on_execute):
            event.remove(Session, "do_orm_execute", self.read_path.on_execute)
        self.session_tracker.unlisten()
        for tier in (self.local_tier, self.tag_listener):
            if tier is not None:
                tier.stop()
        self.runtime.databases.clear()


def _follow_invalidations(
    config: CacheConfig,
    namespace: Namespace,
    store: Store,
    guarded: GuardedStore,
    invalidator: Invalidator,
    breaker: Breaker,
) -> tuple[LocalTier | None, CashewsBridge | None, LocalTier | None]:
    """The in-process tier and the cashews bridge, where configured: (tier, bridge, a subscriber
    that only receives the bridge's tags for an in-process cashews cache)."""
    bridge = None
    if config.cashews is not None:
        bridge = CashewsBridge(config.cashews, config.operation_timeout)
        with contextlib.suppress(RuntimeError):  # the application's loop, if bind() runs in one
            bridge.loop = asyncio.get_running_loop()
        invalidator.bridge = bridge
    if not isinstance(store, RedisStore | ClusterStore):
        return None, bridge, None
    channel = namespace.channel(store.database)
    store.channel = channel  # every bump now publishes its new tokens there
    store.channel_strip = len(namespace.meta_prefix)
    sender = os.urandom(6).hex()
    if bridge is not None:

        def publish(tags: list[str]) -> None:
            if tags:
                message = TAGS + sender.encode() + b"\n" + "\n".join(tags).encode()
                guarded.publish(channel, message)

        bridge.publish = publish
    wants_tier = config.local is not None
    if not (wants_tier or (bridge is not None and is_in_process(bridge.cache))):
        return None, bridge, None
    settings = config.local or {"size": 0, "max_bytes": 0}
    tier = LocalTier(
        size=settings["size"],
        max_bytes=settings["max_bytes"],
        heartbeat=config.local_heartbeat,
        url=config.backend.url,
        options=store.connection_options,
        channel=channel,
        strip=namespace.meta_prefix,
        serving=lambda: not breaker.is_open,
        nodes=getattr(store, "subscriber_nodes", None),
    )
    if bridge is not None:
        tier.subscriber.sender = sender
        tier.on_tags = bridge.received_tags
        tier.on_gap = bridge.lost_messages
    tier.start()
    if wants_tier:
        invalidator.local = tier
        return tier, bridge, None
    return None, bridge, tier
