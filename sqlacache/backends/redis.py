"""`redis://`, `rediss://`, `unix://`: the store shared by every process, on sqlacache's own
redis-py clients.

Every network step is bounded: connecting, the connection handshake, waiting for a connection,
every reply; and there is no client-side retry: a failure is reported at once, and the circuit
breaker decides what happens next. Inside SQLAlchemy's async greenlet the asyncio clients of the
running event loop are used (each loop has its own); elsewhere (a sync `Session`) a blocking
client, created on first use. The hot commands (a hit's MGET, a fill's and a bump's script) go
through lean connections bounded by one deadline around send and read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import threading
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from .._greenlet import await_, in_greenlet
from ..backend_config import BackendConfig
from ..loops import LoopLocal
from ..redis_errors import require_cluster_mode
from .base import Bump, Fill
from .resp import (
    Deadline,
    PoolExhausted,
    bounded_handshake,
    glob_escape,
    no_handshake_metadata,
    pack,
    redis_timeout,
    timeout_after,
)

T = TypeVar("T")

_SCRIPTS = ("bump", "fill", "unlock")
DEFAULT_MAX_CONNECTIONS = 64
MIN_CONNECT_TIMEOUT = 0.25
#: how long a request may queue for a pooled connection: local load, not a Redis fault; during
#: an outage the breaker opens within one operation timeout and later requests never queue
DEFAULT_POOL_TIMEOUT = 1.0
WARM_CONNECTIONS = 4


def connection_options(backend: BackendConfig, operation_timeout: float) -> dict[str, Any]:
    """redis-py options of both Redis backends: the configured ones, then our bounds."""
    options: dict[str, Any] = dict(backend.options)
    options.setdefault("socket_timeout", operation_timeout)
    # Commands are bounded by the operation timeout. Opening a connection gets more: under a
    # burst the event loop is busy and a local connect can take longer than 50 ms, which must
    # not open the circuit breaker at the very moment load arrives.
    options.setdefault("socket_connect_timeout", max(operation_timeout, MIN_CONNECT_TIMEOUT))
    options.setdefault("health_check_interval", 0)
    options.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
    options.setdefault("protocol", 2)  # RESP3 would add a HELLO round trip to every connect
    options.update(no_handshake_metadata())
    return options


@functools.cache
def _lua(name: str) -> str:
    return resources.files("sqlacache").joinpath("lua").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def _lua_sha(name: str) -> str:
    """The SHA1 Redis knows a script by (EVALSHA), as redis-py's `Script` computes it."""
    return hashlib.sha1(_lua(f"{name}.lua").encode()).hexdigest()


def _register_scripts(client: Any) -> dict[str, Any]:
    return {name: client.register_script(_lua(f"{name}.lua")) for name in _SCRIPTS}


class _LoopClients:
    """A `RedisStore`'s asyncio side on one event loop: its gate, pools, client and lean
    connections. asyncio connections and semaphores work only on the loop that made them, so
    each loop gets its own (see `LoopLocal`)."""

    def __init__(self, store: RedisStore) -> None:
        import redis.asyncio as aioredis  # imported lazily: mem:// needs no Redis client

        options = {
            **store._client_options(),
            "redis_connect_func": bounded_handshake(store.connect_timeout),
        }
        # A burst of requests queues at this gate (cheaply) instead of opening hundreds of
        # connections at once; the pool behind it never has to block.
        self.gate = asyncio.Semaphore(store.max_connections)
        self.pool = aioredis.ConnectionPool.from_url(store._url, **options)
        self.client = aioredis.Redis(connection_pool=self.pool)
        # The hot commands (a hit's MGET, a commit's script) go through connections without
        # per-command socket timeouts, bounded instead by one deadline around send and read:
        # redis-py enforces a send timeout with a new task per command, two extra loop turns.
        self.lean_pool = aioredis.ConnectionPool.from_url(
            store._url, **{**options, "socket_timeout": None}
        )
        self.idle: list[Any] = []  # lean connections, last used first
        self.scripts = _register_scripts(self.client)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.pool.disconnect()
        idle, self.idle = self.idle, []
        for connection in idle:
            await connection.disconnect()


class RedisStore:
    """The shared store on a Redis server, through sqlacache's own redis-py clients.

    Every network step is bounded: connecting, the connection handshake, waiting for a
    connection, every reply; and there is no client-side retry: a failure is reported at once, and
    the circuit breaker decides what happens next. Inside SQLAlchemy's async greenlet the asyncio
    clients of the running event loop are used (each loop has its own); elsewhere (a sync
    `Session`) a sync client, created on first use. Each operation is written once against either.
    """

    shared = True
    fills_atomically = True

    def __init__(self, backend: BackendConfig, operation_timeout: float) -> None:
        options = connection_options(backend, operation_timeout)
        self.operation_timeout = float(options["socket_timeout"])
        #: opening a connection, its handshake included
        self.connect_timeout = float(options["socket_connect_timeout"])
        self.max_connections = int(options["max_connections"])
        self._url = backend.url
        self._pool_timeout = float(options.pop("pool_timeout", DEFAULT_POOL_TIMEOUT))
        self._options = options
        self._clients: LoopLocal[_LoopClients] = LoopLocal(lambda: _LoopClients(self))
        self._sync: Any = None
        self._sync_scripts: dict[str, Any] = {}
        self._sync_lock = threading.Lock()
        from redis.connection import parse_url

        self.database = int(options.get("db") or parse_url(backend.url).get("db", 0) or 0)
        #: the channel every bump publishes its new tokens on ("" for none; see `local_tier`),
        #: and the length of the key prefix left out of each message
        self.channel = ""
        self.channel_strip = 0

    def _client_options(self) -> dict[str, Any]:
        """No client-side retries: a failure is reported at once."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return {"decode_responses": False, "retry": Retry(NoBackoff(), 0), **self._options}

    async def _enter_gate(self, gate: asyncio.Semaphore) -> asyncio.Semaphore:
        """Take one of `max_connections` slots, waiting at most the pool timeout (local load)."""
        if gate.locked():
            try:
                await asyncio.wait_for(gate.acquire(), self._pool_timeout)
            except asyncio.TimeoutError:
                raise PoolExhausted(f"no Redis connection within {self._pool_timeout}s") from None
        else:
            await gate.acquire()
        return gate

    async def _gated(self, command: Callable[[Any], Awaitable[T]]) -> T:
        """Run `command(client)` holding one of `max_connections` slots (stampedes under bursts),
        within one deadline: a pooled command may have to connect first, then wait for its reply.
        """
        clients = self._clients.get()
        gate = await self._enter_gate(clients.gate)
        budget = self.connect_timeout + self.operation_timeout
        try:
            async with timeout_after(budget):
                return await command(clients.client)
        except asyncio.TimeoutError:
            raise redis_timeout(f"Redis did not answer within {budget}s") from None
        finally:
            gate.release()

    @property
    def client(self) -> Any:
        """The running event loop's asyncio client."""
        return self._clients.get().client

    def _sync_client(self) -> Any:
        if self._sync is None:
            import redis

            with self._sync_lock:
                if self._sync is None:
                    client = redis.Redis(
                        connection_pool=redis.BlockingConnectionPool.from_url(
                            self._url, timeout=self._pool_timeout, **self._client_options()
                        )
                    )
                    self._sync_scripts = _register_scripts(client)
                    self._sync = client
        return self._sync

    def _scripts_of(self, client: Any) -> dict[str, Any]:
        return self._sync_scripts if client is self._sync else self._clients.get().scripts

    def _call(self, command: Callable[[Any], Any]) -> Any:
        """Run `command(client)` on the async client (awaited in the greenlet) or the sync one."""
        if in_greenlet():
            return await_(self._gated(command))
        return command(self._sync_client())

    # -- the operations --

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        if in_greenlet():
            return await_(self._lean("MGET", *keys))
        return self._sync_client().mget(keys)

    async def _lean(self, *command: Any) -> Any:
        """One command on a lean connection, under the gate and one operation deadline.

        redis-py closes a connection whose send or read is interrupted, so a command cut by the
        deadline never leaves a reply behind for the next user of the connection.
        """
        clients = self._clients.get()
        gate = await self._enter_gate(clients.gate)
        try:
            connection = await self._lean_connection(clients)
            async with Deadline(self.operation_timeout, connection):
                await connection.send_packed_command(pack(command), check_health=False)
                reply = await connection.read_response()
            # only a connection whose reply was read in full goes back (a failure disconnects it)
            clients.idle.append(connection)
            return reply
        finally:
            gate.release()

    async def _lean_connection(self, clients: _LoopClients) -> Any:
        """An idle lean connection, or a new one: its TCP connect and its handshake each have
        the connect timeout (a lean connection has no socket timeout of its own)."""
        idle = clients.idle
        while idle:
            connection = idle.pop()
            if connection.is_connected:
                return connection
        connection = clients.lean_pool.make_connection()
        try:
            await connection.connect()
        except BaseException:
            await connection.disconnect(nowait=True)  # a connect cut short leaves no socket
            raise
        return connection

    def store(self, fill: Fill) -> None:
        if in_greenlet():
            await_(self.store_async(fill))
        else:
            keys, args = fill_arguments(fill)
            client = self._sync_client()
            self._scripts_of(client)["fill"](keys=keys, args=args, client=client)

    async def store_async(self, fill: Fill) -> None:
        """The store, from a coroutine: the read path may run it in the background.

        One script (lua/fill.lua) on a lean connection: atomic like MULTI/EXEC, and a single
        command to pack and a single reply to parse, which is most of a miss's client-side cost.
        """
        await self._lean_script("fill", *fill_arguments(fill))

    async def _lean_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA on a lean connection; EVAL once if the server lost its scripts (a restart)."""
        try:
            return await self._lean("EVALSHA", _lua_sha(name), len(keys), *keys, *args)
        except Exception as exc:
            if type(exc).__name__ != "NoScriptError":
                raise
            return await self._lean("EVAL", _lua(f"{name}.lua"), len(keys), *keys, *args)

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        if in_greenlet():
            await_(self.bump_async(bump, token, row_ttl_ms, lease_ttl_ms))
        else:
            self._bump_with(self._sync_client(), bump, token, row_ttl_ms, lease_ttl_ms)

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None:
        await self._lean_script(
            "bump", *self._bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        )

    def _bump_with(
        self, client: Any, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> Any:
        keys, args = self._bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        return self._scripts_of(client)["bump"](keys=keys, args=args, client=client)

    def _bump_arguments(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> tuple[list[str], list[Any]]:
        keys, args = bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        return keys, [*args, self.channel, self.channel_strip]

    def publish(self, channel: str, message: bytes) -> None:
        """One PUBLISH (the cashews bridge tells other processes which tags to delete)."""
        self._call(lambda c: c.publish(channel, message))

    @property
    def connection_options(self) -> dict[str, Any]:
        """The redis-py options this store connects with (the tier's subscriber reuses them)."""
        return dict(self._options)

    def delete(self, key: str) -> None:
        self._call(lambda c: c.unlink(key))

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        return bool(self._call(lambda c: c.set(key, token, nx=True, px=ttl_ms)))

    def unlock(self, key: str, token: bytes) -> None:
        self._call(lambda c: self._scripts_of(c)["unlock"](keys=[key], args=[token], client=c))

    def add_member(self, key: str, member: str) -> None:
        self._call(lambda c: c.sadd(key, member))

    def warm_up(self) -> None:
        """Open a few pooled connections now, so that the first burst of requests finds working
        connections instead of all connecting at once on a busy event loop."""
        if in_greenlet():
            await_(
                asyncio.gather(*(self._gated(lambda c: c.ping()) for _ in range(WARM_CONNECTIONS)))
            )
        else:
            self._sync_client().ping()

    def members(self, key: str) -> list[str]:
        raw = self._call(lambda c: c.smembers(key))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)

    def delete_entries(self, pattern_prefix: str) -> int:
        match = glob_escape(pattern_prefix) + "*"
        if in_greenlet():
            return await_(delete_matching_async(self.client, match))
        client = self._sync_client()
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=match, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
        return deleted

    def count_keys(self, pattern_prefix: str) -> int:
        match = glob_escape(pattern_prefix) + "*"
        if in_greenlet():
            return await_(self._count_matching_async(match))
        return sum(1 for _ in self._sync_client().scan_iter(match=match, count=1000))

    async def _count_matching_async(self, match: str) -> int:
        return len([k async for k in self.client.scan_iter(match=match, count=1000)])

    def check_config(self) -> None:
        """Raise `ConfigError` if this server is a Redis Cluster node (the URL then needs
        `?cluster=true`). Any other failure is left to the guarded calls that follow at `bind()`:
        an outage stays an outage, and a refused password or database is named by them."""
        from redis.exceptions import RedisError

        try:
            info = self._call(lambda c: c.info("cluster"))
        except (RedisError, OSError, asyncio.TimeoutError):
            return
        require_cluster_mode(info, self._url, wanted=False)

    def ping(self) -> None:
        self._call(lambda c: c.ping())

    def server_id(self) -> str | None:
        info = self._call(lambda c: c.info("server"))
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return None if run_id is None else str(run_id)

    def close(self) -> None:
        self._close_sync()
        if in_greenlet():
            await_(self.aclose())
        else:
            self._close_loops(None)

    async def aclose(self) -> None:
        self._close_sync()
        own = self._close_loops(asyncio.get_running_loop())
        if own is not None:
            await own.aclose()

    def _close_sync(self) -> None:
        client, self._sync = self._sync, None
        if client is not None:
            client.connection_pool.disconnect()

    def _close_loops(self, current: asyncio.AbstractEventLoop | None) -> _LoopClients | None:
        """Forget every loop's clients; return the running loop's, for the caller to close.

        A loop running in another thread closes its own; a closed loop took its connections
        with it; an idle loop's connections close when they are collected.
        """
        own = None
        for loop, clients in self._clients.take_all():
            if loop is current:
                own = clients
            elif loop.is_running() and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # it closed meanwhile
                    asyncio.run_coroutine_threadsafe(clients.aclose(), loop)
        return own


def fill_arguments(fill: Fill) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of lua/fill.lua: the entry and its value, then what `versions_arguments`
    gives (the cluster's lua/fill_versions.lua takes those alone)."""
    keys, args = versions_arguments(fill)
    return [fill.entry_key, *keys], [fill.value, fill.ttl_ms, *args]


def versions_arguments(fill: Fill) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the version half of a fill: the row versions to create (with their
    guards), the table versions to create, the row versions whose TTL to raise."""
    keys: list[str] = []
    args: list[Any] = [
        len(fill.init_rows),
        len(fill.init),
        fill.extend_ms,
        1 if fill.init_rows and fill.guard_rows() else 0,
    ]
    for key, token, guard, seen, planned in fill.init_rows:
        keys += (key, guard)
        args += (token, seen or b"", planned)
    keys += [key for key, _, _ in fill.init]
    args += [token for _, token, _ in fill.init]
    keys += fill.extend
    return keys, args


def bump_arguments(
    bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
) -> tuple[list[str], list[bytes | int]]:
    """KEYS and ARGV of lua/bump.lua."""
    keys = [*bump.persistent, *bump.expiring, *bump.acquire, *bump.release]
    args: list[bytes | int] = [
        len(bump.persistent),
        len(bump.expiring),
        len(bump.acquire),
        token,
        row_ttl_ms,
        lease_ttl_ms,
    ]
    return keys, args


async def delete_matching_async(client: Any, match: str) -> int:
    """SCAN for `match` and UNLINK what it finds, 500 keys a call (a redis-py asyncio client, a
    single server's or a cluster's: the cluster client scans every master)."""
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=match, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await client.unlink(*batch)
    return int(deleted)
