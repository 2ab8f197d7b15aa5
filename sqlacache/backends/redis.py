"""`redis://`, `rediss://`, `unix://`: the store shared by every process, on sqlacache's own
redis-py clients.

Every command has a short deadline and no client-side retry: a failure is reported at once, and
the circuit breaker decides what happens next. Inside SQLAlchemy's async greenlet the asyncio
client is used; elsewhere (a sync `Session`) a blocking client, created on first use. The hot
commands (a hit's MGET, a fill's and a bump's script) go through lean connections bounded by one
deadline around send and read: redis-py enforces a send timeout with a new task per command.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from .._greenlet import await_, either, in_greenlet
from ..config import BackendConfig
from .base import Bump, Fill
from .resp import Deadline, PoolExhausted, glob_escape, no_handshake_metadata, pack

T = TypeVar("T")

_SCRIPTS = ("bump", "fill", "unlock")
DEFAULT_MAX_CONNECTIONS = 64
MIN_CONNECT_TIMEOUT = 0.25
#: how long a request may queue for a pooled connection: local load, not a Redis fault; during
#: an outage the breaker opens within one operation timeout and later requests never queue
DEFAULT_POOL_TIMEOUT = 1.0
WARM_CONNECTIONS = 4


@functools.cache
def _lua(name: str) -> str:
    return resources.files("sqlacache").joinpath("lua").joinpath(name).read_text(encoding="utf-8")


class RedisStore:
    """The shared store on one Redis server (or a managed / Sentinel-fronted one)."""

    shared = True

    def __init__(self, backend: BackendConfig, operation_timeout: float) -> None:
        import redis.asyncio as aioredis  # imported lazily: mem:// needs no Redis client

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
        self.operation_timeout = float(options["socket_timeout"])
        self._url = backend.url
        self._pool_timeout = float(options.pop("pool_timeout", DEFAULT_POOL_TIMEOUT))
        self._options = options
        # A burst of requests queues at this gate (cheaply) instead of opening hundreds of
        # connections at once; the pool behind it never has to block.
        self._gate = asyncio.Semaphore(int(options["max_connections"]))
        self._pool = aioredis.ConnectionPool.from_url(backend.url, **self._client_options())
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._lean_pool = aioredis.ConnectionPool.from_url(
            backend.url, **{**self._client_options(), "socket_timeout": None}
        )
        self._idle: list[Any] = []  # lean connections, last used first
        self._sync: Any = None
        self._scripts = {id(self._client): self._register_scripts(self._client)}
        self.database = int(self._pool.connection_kwargs.get("db", 0) or 0)

    @staticmethod
    def _register_scripts(client: Any) -> dict[str, Any]:
        return {name: client.register_script(_lua(f"{name}.lua")) for name in _SCRIPTS}

    def _client_options(self) -> dict[str, Any]:
        """No client-side retries: a failure is reported at once."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return {"decode_responses": False, "retry": Retry(NoBackoff(), 0), **self._options}

    # -- clients --

    def _sync_client(self) -> Any:
        if self._sync is None:
            import redis

            self._sync = redis.Redis(
                connection_pool=redis.BlockingConnectionPool.from_url(
                    self._url, timeout=self._pool_timeout, **self._client_options()
                )
            )
            self._scripts[id(self._sync)] = self._register_scripts(self._sync)
        return self._sync

    async def _enter_gate(self) -> asyncio.Semaphore:
        """Take one of `max_connections` slots, waiting at most the pool timeout (local load)."""
        gate = self._gate
        if gate.locked():
            try:
                await asyncio.wait_for(gate.acquire(), self._pool_timeout)
            except asyncio.TimeoutError:
                raise PoolExhausted(f"no Redis connection within {self._pool_timeout}s") from None
        else:
            await gate.acquire()
        return gate

    async def _gated(self, command: Callable[[Any], Awaitable[T]]) -> T:
        """Run `command(client)` holding one of `max_connections` slots (stampedes under bursts)."""
        gate = await self._enter_gate()
        try:
            return await command(self._client)
        finally:
            gate.release()

    def _call(self, command: Callable[[Any], Any]) -> Any:
        """Run `command(client)` on the async client (awaited in the greenlet) or the sync one."""
        return either(lambda: self._gated(command), lambda: command(self._sync_client()))

    async def _lean(self, *command: Any) -> Any:
        """One command on a lean connection, under the gate and one operation deadline.

        redis-py closes a connection whose send or read is interrupted, so a command cut by the
        deadline never leaves a reply behind for the next user of the connection.
        """
        gate = await self._enter_gate()
        try:
            connection = await self._lean_connection()
            async with Deadline(self.operation_timeout, connection):
                await connection.send_packed_command(pack(command), check_health=False)
                reply = await connection.read_response()
            # only a connection whose reply was read in full goes back (a failure disconnects it)
            self._idle.append(connection)
            return reply
        finally:
            gate.release()

    async def _lean_connection(self) -> Any:
        """An idle lean connection, or a new one (connecting has its own timeout)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.is_connected:
                return connection
        connection = self._lean_pool.make_connection()
        await connection.connect()
        return connection

    async def _lean_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA on a lean connection; EVAL once if the server lost its scripts (a restart)."""
        script = self._scripts[id(self._client)][name]
        try:
            return await self._lean("EVALSHA", script.sha, len(keys), *keys, *args)
        except Exception as exc:
            if type(exc).__name__ != "NoScriptError":
                raise
            return await self._lean("EVAL", script.script, len(keys), *keys, *args)

    def _sync_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self._sync_client()
        return self._scripts[id(client)][name](keys=keys, args=args, client=client)

    # -- the three operations of the cache --

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        if in_greenlet():  # the hit path: no closures to build
            return await_(self._lean("MGET", *keys))
        return self._sync_client().mget(keys)

    def store(self, fill: Fill) -> None:
        either(
            lambda: self.store_async(fill), lambda: self._sync_script("fill", *fill_arguments(fill))
        )

    async def store_async(self, fill: Fill) -> None:
        """One script (lua/fill.lua): atomic like MULTI/EXEC, one command to pack, one reply."""
        await self._lean_script("fill", *fill_arguments(fill))

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        arguments = bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        either(
            lambda: self._lean_script("bump", *arguments),
            lambda: self._sync_script("bump", *arguments),
        )

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None:
        await self._lean_script("bump", *bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms))

    # -- bookkeeping --

    def delete(self, key: str) -> None:
        self._call(lambda c: c.unlink(key))

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        return bool(self._call(lambda c: c.set(key, token, nx=True, px=ttl_ms)))

    def unlock(self, key: str, token: bytes) -> None:
        self._call(lambda c: self._scripts[id(c)]["unlock"](keys=[key], args=[token], client=c))

    def add_member(self, key: str, member: str) -> None:
        self._call(lambda c: c.sadd(key, member))

    def members(self, key: str) -> list[str]:
        raw = self._call(lambda c: c.smembers(key))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)

    def warm_up(self) -> None:
        """Open a few pooled connections now, so that the first burst of requests finds working
        connections instead of all connecting at once on a busy event loop."""
        either(
            lambda: asyncio.gather(*(self._client.ping() for _ in range(WARM_CONNECTIONS))),
            lambda: self._sync_client().ping(),
        )

    def delete_entries(self, pattern_prefix: str) -> int:
        match = glob_escape(pattern_prefix) + "*"
        return either(
            lambda: self._delete_matching_async(match), lambda: self._delete_matching(match)
        )

    def _delete_matching(self, match: str) -> int:
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

    async def _delete_matching_async(self, match: str) -> int:
        deleted = 0
        batch: list[bytes] = []
        async for key in self._client.scan_iter(match=match, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self._client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self._client.unlink(*batch)
        return deleted

    def count_keys(self, pattern_prefix: str) -> int:
        match = glob_escape(pattern_prefix) + "*"
        return either(
            lambda: self._count_matching_async(match),
            lambda: sum(1 for _ in self._sync_client().scan_iter(match=match, count=1000)),
        )

    async def _count_matching_async(self, match: str) -> int:
        return len([k async for k in self._client.scan_iter(match=match, count=1000)])

    def ping(self) -> None:
        self._call(lambda c: c.ping())

    def server_id(self) -> str | None:
        info = self._call(lambda c: c.info("server"))
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return None if run_id is None else str(run_id)

    def close(self) -> None:
        self._close_sync()
        either(self.aclose, lambda: None)

    async def aclose(self) -> None:
        self._close_sync()
        await self._client.aclose()
        await self._pool.disconnect()
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()

    def _close_sync(self) -> None:
        if self._sync is not None:
            self._sync.connection_pool.disconnect()
            self._sync = None


def fill_arguments(fill: Fill) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of lua/fill.lua."""
    keys = [fill.entry_key]
    args: list[Any] = [
        fill.value,
        fill.ttl_ms,
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
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of lua/bump.lua."""
    keys = [*bump.persistent, *bump.expiring, *bump.acquire, *bump.release]
    args: list[Any] = [
        len(bump.persistent),
        len(bump.expiring),
        len(bump.acquire),
        token,
        row_ttl_ms,
        lease_ttl_ms,
    ]
    return keys, args
