"""The shared store on Redis Cluster: the same operations as `RedisStore`, laid out by slot.

Version, lease, epoch and registry keys of a prefix share the hash tag `{prefix}`: they live in one
slot (the *meta slot*), so the bump script and the version half of a fill stay atomic there.
Entries (`prefix:e:<digest>`) are spread over the masters by their digest. A hit is one pipelined
call to at most two nodes, sent to both before either reply is read: `GET` of the entry on its node
and `MGET` of the versions and leases on the meta node; the caller compares the entry's stamp with
the versions (that comparison replaces a cross-slot script).

Topology (which master serves which slot) comes from redis-py's `RedisCluster`, which also runs the
commands off the hot path. The hot commands (fetch, fill, bump) go through sqlacache's own lean
connections per node, bounded by one operation deadline, following MOVED and ASK redirections and
retrying TRYAGAIN a few times, never retrying a failure: a dead or silent meta node raises at once,
so the circuit breaker sees it, and the next operation refreshes the topology (a replica promoted
in the meantime is found). A dead or silent entry node only costs its entries: its reads are
misses and its fills are dropped for a moment, while invalidations go on (see `fetch_async`).
A bump is acknowledged only once a replica of the meta slot has it (`WAIT`): a master that dies
right after a bump cannot take the invalidation with it when its replica is promoted.

What runs off the hot path (warm-up, the probe, the data's identity, the cluster-mode check,
scans) is in `cluster_health`; topology and per-node connections in `cluster_nodes`.

Recommended server setting: `cluster-require-full-coverage no`, or one shard's outage stops every
node, the meta slot's master included, until its replica takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from .._greenlet import await_, in_greenlet
from ..backend_config import BackendConfig
from ..loops import LoopLocal
from .base import Bump, Fill
from .cluster_health import ClusterHealth
from .cluster_nodes import (
    ClusterLoopState,
    connected_replicas,
    plain_options,
    url_node,
)
from .redis import (  # the constants and scripts both Redis backends share
    DEFAULT_POOL_TIMEOUT,
    _lua,
    bump_arguments,
    connection_options,
    versions_arguments,
)

T = TypeVar("T")

#: How long an entry node that failed is skipped (its reads are misses, its fills dropped).
NODE_DOWN_SECONDS = 0.5
_SCRIPTS = ("bump", "fill_versions", "unlock")


class ReplicationShortfall(Exception):
    """A bump reached the master but no replica within the deadline: it may not survive a
    failover, so it is reported as undelivered (and redelivered)."""


class ClusterStore(ClusterHealth):
    """The shared store on a Redis Cluster (`redis://host:port?cluster=true`)."""

    shared = True
    fills_atomically = False

    def __init__(self, backend: BackendConfig, operation_timeout: float) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options = connection_options(backend, operation_timeout)
        self.operation_timeout = float(options["socket_timeout"])
        self._pool_timeout = float(options.pop("pool_timeout", DEFAULT_POOL_TIMEOUT))
        self._url = backend.url
        self._startup = list(backend.startup_nodes) or [url_node(backend.url)]
        self._options = options
        # No retries beyond redirection: a failure is reported at once; the breaker decides.
        self._cluster_options: dict[str, Any] = {
            "decode_responses": False,
            "retry": Retry(NoBackoff(), 0),
            "reinitialize_steps": 1,
            **options,
        }
        max_connections = int(options["max_connections"])
        self._loops = LoopLocal(
            lambda: ClusterLoopState(
                backend.url, self._startup, self._cluster_options, max_connections
            )
        )
        self._refresh_due = False
        self._refreshed_at = 0.0
        self._down: dict[tuple[str, int], float] = {}  # entry nodes skipped until then
        self._replica_counts: dict[tuple[str, int], int] = {}  # per master, for WAIT
        self._landing_sync: dict[str, threading.Event] = {}  # the same, from sync sessions
        self._meta_slot: int | None = None  # learnt from the first operation naming meta keys
        self._sync: Any = None
        self._sync_scripts: dict[str, Any] = {}
        self._sources = {name: _lua(f"{name}.lua") for name in _SCRIPTS}
        self._shas = {name: _sha1(source) for name, source in self._sources.items()}
        self.database = 0
        #: the channel every bump publishes its new tokens on ("" for none; see `local_tier`); a
        #: cluster's classic pub/sub reaches subscribers on every node
        self.channel = ""
        self.channel_strip = 0
        #: a key of the meta slot, named by `bind_namespace`
        self.meta_key: str | None = None

    # -- the operations ---------------------------------------------------------------------------

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        if in_greenlet():
            return await_(self.fetch_async(keys))
        # the sync cluster client pipelines no multi-key command: two round trips here, the
        # versions first (an entry read after them is checked against them all the same)
        client = self._sync_client()
        meta = client.mget(list(keys[1:])) if len(keys) > 1 else []
        entry = client.get(keys[0])
        landing = self._landing_sync.get(keys[0])
        if entry is None and landing is not None:  # a thread of this process is storing it
            landing.wait(self.operation_timeout)
            entry = client.get(keys[0])
        return [entry, *meta]

    async def fetch_async(self, keys: Sequence[str]) -> list[bytes | None]:
        """The entry (keys[0]) from its node and the meta keys (keys[1:], one slot) from the
        meta node, in one round trip.

        A failed entry node is a miss, not a failure: its entries are only a copy of the
        database, while the meta node carries every invalidation. So the call still answers with
        the versions, and the node is skipped for NODE_DOWN_SECONDS (or until the topology names
        another master for its slots). Were it reported, the breaker would open and stop this
        process's invalidations too, though the meta node could take them.
        """
        if len(keys) == 1:
            (entry,) = await self._run([(keys[0], [("GET", keys[0])])])
            return [entry[0]]
        self._meta_slot = self._slot(keys[1])
        meta_group = (keys[1], [("MGET", *keys[1:])])
        entry_node = await self._node_of(keys[0])
        if entry_node is not None and self._is_down(entry_node):
            (meta,) = await self._run([meta_group])
            return [None, *meta[0]]
        try:
            entry, meta = await self._run([(keys[0], [("GET", keys[0])]), meta_group])
        except Exception as exc:
            if entry_node is None or not self._blame_entry_node(exc, entry_node, keys[1]):
                raise
            (meta,) = await self._run([meta_group])
            return [None, *meta[0]]
        if entry[0] is None:
            return [await self._landed(keys[0]), *meta[0]]
        return [entry[0], *meta[0]]

    async def _landed(self, key: str) -> bytes | None:
        """The entry, if this process is writing it right now (between the two halves of its
        fill): a reader that finds the new versions but not yet the entry waits for the SET
        (one round trip) instead of missing. Read after the versions, which is safe: the caller
        still checks the entry's stamp against them."""
        landing = self._landing.get(key)
        if landing is None or landing.get_loop() is not asyncio.get_running_loop():
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(landing), self.operation_timeout)
        (entry,) = await self._run([(key, [("GET", key)])])
        return entry[0]

    async def _node_of(self, key: str) -> tuple[str, int] | None:
        manager = await self._topology()
        nodes = manager.slots_cache.get(self._slot(key))
        return (nodes[0].host, int(nodes[0].port)) if nodes else None

    def _is_down(self, node: tuple[str, int]) -> bool:
        until = self._down.get(node)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._down[node]
        return False

    def _blame_entry_node(self, exc: Exception, entry_node: tuple[str, int], meta_key: str) -> bool:
        """Whether `exc` was a transport failure of the entry's node alone (then it is marked
        down); False for anything else, or when the meta node is that same node."""
        from redis.exceptions import ConnectionError, TimeoutError

        transport = isinstance(exc, ConnectionError | TimeoutError | OSError | asyncio.TimeoutError)
        blamed = getattr(exc, "sqlacache_node", None)
        manager = self._client.nodes_manager
        meta_nodes = manager.slots_cache.get(self._slot(meta_key)) or []
        meta_node = (meta_nodes[0].host, int(meta_nodes[0].port)) if meta_nodes else None
        if not transport or blamed != entry_node or blamed == meta_node:
            return False
        self._down[entry_node] = time.monotonic() + NODE_DOWN_SECONDS
        return True

    def store(self, fill: Fill) -> None:
        if in_greenlet():
            await_(self.store_async(fill))
            return
        keys, args = versions_arguments(fill)
        client = self._sync_client()
        landing = self._landing_sync[fill.entry_key] = threading.Event()
        try:
            valid = 1
            if keys:
                valid = int(self._sync_scripts["fill_versions"](keys=keys, args=args))
            if valid:
                client.set(fill.entry_key, fill.value, px=fill.ttl_ms)
        finally:
            landing.set()
            if self._landing_sync.get(fill.entry_key) is landing:
                del self._landing_sync[fill.entry_key]

    async def store_async(self, fill: Fill) -> None:
        """Store a fill (see `_fill`); readers of this process that find its versions before its
        entry wait for the entry (see `_landed`)."""
        landing = asyncio.get_running_loop().create_future()
        self._landing[fill.entry_key] = landing
        try:
            await self._fill(fill)
        finally:
            landing.set_result(None)
            if self._landing.get(fill.entry_key) is landing:
                del self._landing[fill.entry_key]

    async def _fill(self, fill: Fill) -> None:
        """A fill in two steps, where a single Redis runs one script (lua/fill.lua).

        First the version half (lua/fill_versions.lua) on the meta slot, atomically: it creates
        the versions the entry's stamp names and answers whether every one now holds the token
        the entry was stamped with. Then, only if so, the entry is SET with its TTL on its own
        node. This is as safe as the single script: a reader serves an entry only if its stamp
        equals the versions it reads in the same fetch, so an entry written after a concurrent
        bump (between the two steps, or at any time) carries the old tokens and never validates.
        Versions are written before the entry, so a reader never finds the entry without them
        (and if it did, a missing version never validates). Row versions the script creates or
        raises outlive the entry by ROW_VERSION_MARGIN_MS, far more than the gap between steps.
        """
        keys, args = versions_arguments(fill)
        if keys:
            meta_key = keys[0]
            (replies,) = await self._run([(meta_key, [self._evalsha("fill_versions", keys, args)])])
            valid = await self._script_reply(meta_key, "fill_versions", keys, args, replies[0])
            if not valid:
                return
        # the entry's own node failing is no failure of the cache: the entry is simply not kept
        entry_node = await self._node_of(fill.entry_key)
        if entry_node is not None and self._is_down(entry_node):
            return
        write = (fill.entry_key, [("SET", fill.entry_key, fill.value, "PX", fill.ttl_ms)])
        try:
            await self._run([write])
        except Exception as exc:
            if (
                entry_node is None
                or not keys
                or not self._blame_entry_node(exc, entry_node, keys[0])
            ):
                raise

    def _evalsha(self, name: str, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self._shas[name], len(keys), *keys, *args)

    async def _script_reply(
        self, key: str, name: str, keys: list[str], args: list[Any], reply: Any
    ) -> Any:
        """A script's reply; EVAL once if the node lost its scripts (a restart, a new master)."""
        from redis.exceptions import NoScriptError

        if not isinstance(reply, NoScriptError):
            return reply
        (replies,) = await self._run(
            [(key, [("EVAL", self._sources[name], len(keys), *keys, *args)])]
        )
        return replies[0]

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        if in_greenlet():
            await_(self.bump_async(bump, token, row_ttl_ms, lease_ttl_ms))
            return
        keys, args = self._bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        client = self._sync_client()
        node = client.get_node_from_key(keys[0])
        connection = client.get_redis_connection(node)
        pipe = connection.pipeline(transaction=False)
        self._sync_scripts["bump"](keys=keys, args=args, client=pipe)
        replicas = min(1, connected_replicas(connection.info("replication")))
        if replicas:  # within the sync client's socket timeout, which bounds the whole reply
            pipe.execute_command("WAIT", replicas, max(1, self._wait_ms() * 3 // 4))
        replies = pipe.execute()
        if replicas and int(replies[-1]) < replicas:
            raise ReplicationShortfall(f"bump reached {replies[-1]} of {replicas} replicas")

    @property
    def connection_options(self) -> dict[str, Any]:
        """Options of a plain client to one node (the tier's subscriber: a cluster forwards
        classic pub/sub messages to every node)."""
        return plain_options(self._options, self._url)

    def _bump_arguments(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> tuple[list[str], list[Any]]:
        keys, args = bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        return keys, [*args, self.channel, self.channel_strip]

    def publish(self, channel: str, message: bytes) -> None:
        """One PUBLISH (the cashews bridge); a cluster forwards it to every node."""
        self._call(lambda c: c.publish(channel, message), lambda c: c.publish(channel, message))

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None:
        """lua/bump.lua on the meta slot (it touches only version and lease keys), then WAIT on
        the same connection: acknowledged once a replica of the meta slot holds it."""
        keys, args = self._bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        self._meta_slot = self._slot(keys[0])
        replicas = min(1, await self._replicas_of(keys[0]))
        commands: list[tuple[Any, ...]] = [self._evalsha("bump", keys, args)]
        if replicas > 0:
            commands.append(("WAIT", replicas, self._wait_ms()))
        wait = self._wait_ms() / 1000 if replicas > 0 else 0.0
        (replies,) = await self._run([(keys[0], commands)], wait)
        from redis.exceptions import NoScriptError

        if isinstance(replies[0], NoScriptError):
            commands[0] = ("EVAL", self._sources["bump"], len(keys), *keys, *args)
            (replies,) = await self._run([(keys[0], commands)], wait)
        if replicas > 0 and int(replies[-1]) < replicas:
            self._mark_failed()  # a failed replica drops out of the topology once refreshed
            raise ReplicationShortfall(f"bump reached {replies[-1]} of {replicas} replicas")

    def _wait_ms(self) -> int:
        return max(1, int(self.operation_timeout * 1000))

    async def _replicas_of(self, key: str) -> int:
        """How many replicas the master of `key`'s slot has (asked once per master, and again
        after a failure: a replica that died drops out of WAIT's count)."""
        node = await self._node_of(key)
        if node is None:
            return 0
        count = self._replica_counts.get(node)
        if count is None:
            (replies,) = await self._run([(key, [("INFO", "replication")])])
            count = self._replica_counts[node] = connected_replicas(replies[0])
        return count

    def delete(self, key: str) -> None:
        self._call(lambda c: c.unlink(key), lambda c: c.unlink(key))

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        return bool(
            self._call(
                lambda c: c.set(key, token, nx=True, px=ttl_ms),
                lambda c: c.set(key, token, nx=True, px=ttl_ms),
            )
        )

    def unlock(self, key: str, token: bytes) -> None:
        source = self._sources["unlock"]
        self._call(
            lambda c: c.eval(source, 1, key, token),
            lambda c: self._sync_scripts["unlock"](keys=[key], args=[token]),
        )

    def add_member(self, key: str, member: str) -> None:
        self._call(lambda c: c.sadd(key, member), lambda c: c.sadd(key, member))

    def members(self, key: str) -> list[str]:
        raw = self._call(lambda c: c.smembers(key), lambda c: c.smembers(key))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)


# -- helpers ----------------------------------------------------------------------------------


def _sha1(source: str) -> str:
    import hashlib

    return hashlib.sha1(source.encode()).hexdigest()


def check_config(store: Any) -> None:
    """Raise `ConfigError` when the backend's cluster mode contradicts the configuration.

    For a `ClusterStore`, the server must be a cluster node; for a plain `RedisStore`, it must
    not be one (a cluster node answers MOVED for most keys). None when it agrees, for `mem://`,
    and when the server cannot answer (an outage, or a mistake the breaker's classification
    names). Meant to run at `bind()`, outside the circuit breaker, so that the `ConfigError`
    reaches the caller.
    """
    own = getattr(store, "check_config", None)
    if own is not None:
        own()
