"""Storage backends behind one small interface: `mem://` in process, `redis://` shared.

The rest of sqlacache never asks which backend it has. Each operation is one round trip on Redis:
`fetch` (entry + versions + leases in one MGET), `store` (entry + version initialisation in one
script), `bump` (versions + leases in one script). Redis-specific tricks stay in `RedisStore`.
"""

from __future__ import annotations

import asyncio
import functools
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, TypeVar

from ._greenlet import await_, in_greenlet
from .config import BackendConfig
from .keys import FAST_FILL_SECONDS

T = TypeVar("T")


@dataclass
class Bump:
    """One invalidation round: new tokens for version keys, lease changes."""

    persistent: list[str] = field(default_factory=list)
    expiring: list[str] = field(default_factory=list)
    acquire: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persistent or self.expiring or self.acquire or self.release)


@dataclass
class Fill:
    """One entry to store, with the version keys it must initialise or keep alive."""

    entry_key: str
    value: bytes
    ttl_ms: int
    #: table versions (key, token, None) to create if still missing; they never expire
    init: list[tuple[str, bytes, None]] = field(default_factory=list)
    #: row versions (key, token, guarding table version key, the value the reader saw there, the
    #: token this process creates that table version with) to create with TTL `extend_ms` if still
    #: missing and the table version is unchanged (see lua/fill.lua)
    init_rows: list[tuple[str, bytes, str, bytes | None, bytes]] = field(default_factory=list)
    #: row versions whose TTL must be raised to at least `extend_ms` (never shortened)
    extend: list[str] = field(default_factory=list)
    extend_ms: int = 0
    #: `time.monotonic()` before the stamp was fetched (see `guard_rows`)
    captured_at: float = 0.0

    def guard_rows(self) -> bool:
        """Whether creating row versions must be guarded by their table's version.

        A written row's version lives at least WRITTEN_ROW_TTL_MS after its last write; a fill
        stored sooner than that after reading its stamp cannot have missed a write whose version
        came and went meanwhile, so a plain SET NX is exact. Slower fills take the guard.
        """
        return time.monotonic() - self.captured_at > FAST_FILL_SECONDS


class Store(Protocol):
    """What every backend provides. Methods are synchronous for the caller (see `_greenlet`)."""

    kind: str
    shared: bool

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def store(self, fill: Fill) -> None: ...

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None: ...

    def delete(self, key: str) -> None: ...

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool: ...

    def unlock(self, key: str, token: bytes) -> None: ...

    def add_member(self, key: str, member: str) -> None: ...

    def warm_up(self) -> None: ...

    def members(self, key: str) -> list[str]: ...

    def delete_entries(self, pattern_prefix: str) -> int: ...

    def count_keys(self, pattern_prefix: str) -> int: ...

    def ping(self) -> None: ...

    def server_id(self) -> str | None:
        """An identity of the backend that changes when it restarts (None if it cannot)."""
        ...

    def close(self) -> None: ...


# -- mem:// --------------------------------------------------------------------------------------


class MemoryStore:
    """A thread-safe in-process store.

    Entries live in an LRU bounded by count and bytes; version, lease and lock keys live in their own
    dict, so that pressure on entries can never evict the bookkeeping that validates them.
    """

    kind = "memory"
    shared = False

    def __init__(self, size: int = 10_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._keys: dict[str, tuple[float, bytes]] = {}  # versions, leases, locks
        self._sets: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._writes = 0

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        with self._lock:
            entry = self._entries.get(keys[0])
            if entry is not None:
                if entry[0] > now:
                    self._entries.move_to_end(keys[0])
                    out.append(entry[1])
                else:
                    self._drop_entry(keys[0])
                    out.append(None)
            else:
                out.append(None)
            get = self._keys.get
            for key in keys[1:]:
                item = get(key)
                out.append(item[1] if item is not None and item[0] > now else None)
        return out

    def store(self, fill: Fill) -> None:
        now = time.monotonic()
        with self._lock:
            guarded = fill.guard_rows()
            valid = True  # as lua/fill.lua: store no entry that could never validate
            for key, token, guard, seen, planned in fill.init_rows:
                table_version = self._live(guard, now)
                unchanged = (
                    not guarded
                    or table_version == seen
                    or (seen is None and table_version == planned)
                )
                current = self._live(key, now)
                if unchanged and current is None:
                    self._keys[key] = (now + fill.extend_ms / 1000, token)
                elif not unchanged or current != token:
                    valid = False
            for key, token, _ in fill.init:
                current = self._live(key, now)
                if current is None:
                    self._keys[key] = (float("inf"), token)
                elif current != token:
                    valid = False
            for key in fill.extend:
                current_ttl = self._keys.get(key)
                if current_ttl is not None and current_ttl[0] < now + fill.extend_ms / 1000:
                    self._keys[key] = (now + fill.extend_ms / 1000, current_ttl[1])
            if valid:
                self._drop_entry(fill.entry_key)
                self._entries[fill.entry_key] = (now + fill.ttl_ms / 1000, fill.value)
                self._bytes += len(fill.value)
                self._evict()
            self._sweep(now)

    def _live(self, key: str, now: float) -> bytes | None:
        item = self._keys.get(key)
        return item[1] if item is not None and item[0] > now else None

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        now = time.monotonic()
        forever = float("inf")
        with self._lock:
            for key in bump.persistent:
                self._keys[key] = (forever, token)
            for key in bump.expiring:
                self._keys[key] = (now + row_ttl_ms / 1000, token)
            for key in bump.acquire:
                held = self._keys.get(key)
                count = int(held[1]) if held is not None and held[0] > now else 0
                self._keys[key] = (now + lease_ttl_ms / 1000, str(count + 1).encode())
            for key in bump.release:
                held = self._keys.get(key)
                if held is None or held[0] <= now:
                    continue
                count = int(held[1]) - 1
                if count <= 0:
                    del self._keys[key]
                else:
                    self._keys[key] = (held[0], str(count).encode())
            self._sweep(now)

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop_entry(key)

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        now = time.monotonic()
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[0] > now:
                return False
            self._keys[key] = (now + ttl_ms / 1000, token)
            return True

    def unlock(self, key: str, token: bytes) -> None:
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[1] == token:
                del self._keys[key]

    def warm_up(self) -> None:
        return None

    def add_member(self, key: str, member: str) -> None:
        with self._lock:
            self._sets.setdefault(key, set()).add(member)

    def members(self, key: str) -> list[str]:
        with self._lock:
            return sorted(self._sets.get(key, ()))

    def delete_entries(self, pattern_prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._entries if k.startswith(pattern_prefix)]
            for key in doomed:
                self._drop_entry(key)
            return len(doomed)

    def count_keys(self, pattern_prefix: str) -> int:
        now = time.monotonic()
        with self._lock:
            entries = sum(
                1 for k, v in self._entries.items() if k.startswith(pattern_prefix) and v[0] > now
            )
            others = sum(
                1 for k, v in self._keys.items() if k.startswith(pattern_prefix) and v[0] > now
            )
            return entries + others

    def ping(self) -> None:
        return None

    def server_id(self) -> str | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._keys.clear()
            self._sets.clear()
            self._bytes = 0

    # -- internals --

    def _drop_entry(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self._size or self._bytes > self._max_bytes):
            _, (_, value) = self._entries.popitem(last=False)
            self._bytes -= len(value)

    def _sweep(self, now: float) -> None:
        # Expired row versions, leases and locks are dropped every so often so that bookkeeping
        # stays bounded by what is live (SPEC S3), without a background thread.
        self._writes += 1
        if self._writes % 1024:
            return
        for key in [k for k, v in self._keys.items() if v[0] <= now]:
            del self._keys[key]
        for key in [k for k, v in self._entries.items() if v[0] <= now]:
            self._drop_entry(key)


# -- redis:// ------------------------------------------------------------------------------------

_SCRIPTS = ("bump", "fill", "unlock")
DEFAULT_MAX_CONNECTIONS = 64
MIN_CONNECT_TIMEOUT = 0.25
#: how long a request may queue for a pooled connection: local load, not a Redis fault; during
#: an outage the breaker opens within one operation timeout and later requests never queue
DEFAULT_POOL_TIMEOUT = 1.0
WARM_CONNECTIONS = 4


def _no_handshake_metadata() -> dict[str, Any]:
    """Options that stop redis-py sending CLIENT SETINFO on every new connection."""
    import inspect

    from redis.asyncio.connection import AbstractConnection

    parameters = inspect.signature(AbstractConnection.__init__).parameters
    if "driver_info" in parameters:  # redis-py 8
        return {"driver_info": None}
    if "lib_name" in parameters:  # redis-py 5-7
        return {"lib_name": None, "lib_version": None}
    return {}


class PoolExhausted(Exception):
    """A request waited its whole `pool_timeout` for a connection: local load, not an outage."""


def is_pool_exhausted(exc: BaseException) -> bool:
    return isinstance(exc, PoolExhausted) or (
        type(exc).__name__ == "ConnectionError" and "No connection available" in str(exc)
    )


@functools.cache
def _lua(name: str) -> str:
    return resources.files("sqlacache").joinpath("lua").joinpath(name).read_text(encoding="utf-8")


class RedisStore:
    """The shared store on a Redis server, through sqlacache's own redis-py clients.

    Every command has a short socket timeout (SPEC F2) and no client-side retry: a failure is
    reported at once, and the circuit breaker decides what happens next. Inside SQLAlchemy's async
    greenlet the asyncio client is used; elsewhere (a sync `Session`) a sync client, created on
    first use. Each operation is written once against either client.
    """

    kind = "redis"
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
        options.update(_no_handshake_metadata())
        self.operation_timeout = float(options["socket_timeout"])
        self._url = backend.url
        self._pool_timeout = float(options.pop("pool_timeout", DEFAULT_POOL_TIMEOUT))
        self._options = options
        # A burst of requests queues at this gate (cheaply) instead of opening hundreds of
        # connections at once; the pool behind it never has to block.
        self._gate = asyncio.Semaphore(int(options["max_connections"]))
        self._pool = aioredis.ConnectionPool.from_url(backend.url, **self._client_options())
        self._client = aioredis.Redis(connection_pool=self._pool)
        # The hot commands (a hit's MGET, a commit's script) go through connections without
        # per-command socket timeouts, bounded instead by one deadline around send and read:
        # redis-py enforces a send timeout with a new task per command, two extra loop turns.
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
        """Run `command(client)` holding one of `max_connections` slots (SPEC F5 under bursts)."""
        gate = await self._enter_gate()
        try:
            return await command(self._client)
        finally:
            gate.release()

    @property
    def client(self) -> Any:
        return self._client

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
        gate = await self._enter_gate()
        try:
            connection = await self._lean_connection()
            async with _Deadline(self.operation_timeout, connection):
                await connection.send_packed_command(_pack(command), check_health=False)
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

    def store(self, fill: Fill) -> None:
        if in_greenlet():
            await_(self.store_async(fill))
        else:
            keys, args = _fill_arguments(fill)
            self._scripts[id(self._sync_client())]["fill"](keys=keys, args=args)

    async def store_async(self, fill: Fill) -> None:
        """The store, from a coroutine: the read path may run it in the background.

        One script (lua/fill.lua) on a lean connection: atomic like MULTI/EXEC, and a single
        command to pack and a single reply to parse, which is most of a miss's client-side cost.
        """
        await self._lean_script("fill", *_fill_arguments(fill))

    async def _lean_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA on a lean connection; EVAL once if the server lost its scripts (a restart)."""
        script = self._scripts[id(self._client)][name]
        try:
            return await self._lean("EVALSHA", script.sha, len(keys), *keys, *args)
        except Exception as exc:
            if type(exc).__name__ != "NoScriptError":
                raise
            return await self._lean("EVAL", script.script, len(keys), *keys, *args)

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        if in_greenlet():
            await_(self.bump_async(bump, token, row_ttl_ms, lease_ttl_ms))
        else:
            self._bump_with(self._sync_client(), bump, token, row_ttl_ms, lease_ttl_ms)

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None:
        await self._lean_script("bump", *_bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms))

    def _bump_with(
        self, client: Any, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> Any:
        keys, args = _bump_arguments(bump, token, row_ttl_ms, lease_ttl_ms)
        return self._scripts[id(client)]["bump"](keys=keys, args=args, client=client)

    def delete(self, key: str) -> None:
        self._call(lambda c: c.unlink(key))

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        return bool(self._call(lambda c: c.set(key, token, nx=True, px=ttl_ms)))

    def unlock(self, key: str, token: bytes) -> None:
        self._call(lambda c: self._scripts[id(c)]["unlock"](keys=[key], args=[token], client=c))

    def add_member(self, key: str, member: str) -> None:
        self._call(lambda c: c.sadd(key, member))

    def warm_up(self) -> None:
        """Open a few pooled connections now, so that the first burst of requests finds working
        connections instead of all connecting at once on a busy event loop."""
        if in_greenlet():
            await_(asyncio.gather(*(self._client.ping() for _ in range(WARM_CONNECTIONS))))
        else:
            self._sync_client().ping()

    def members(self, key: str) -> list[str]:
        raw = self._call(lambda c: c.smembers(key))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)

    def delete_entries(self, pattern_prefix: str) -> int:
        match = _glob_escape(pattern_prefix) + "*"
        if in_greenlet():
            return await_(self._delete_matching_async(match))
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
        match = _glob_escape(pattern_prefix) + "*"
        if in_greenlet():
            return await_(self._count_matching_async(match))
        return sum(1 for _ in self._sync_client().scan_iter(match=match, count=1000))

    async def _count_matching_async(self, match: str) -> int:
        return len([k async for k in self._client.scan_iter(match=match, count=1000)])

    def ping(self) -> None:
        self._call(lambda c: c.ping())

    def server_id(self) -> str | None:
        info = self._call(lambda c: c.info("server"))
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return None if run_id is None else str(run_id)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.connection_pool.disconnect()
            self._sync = None
        if in_greenlet():
            await_(self.aclose())

    async def aclose(self) -> None:
        if self._sync is not None:
            self._sync.connection_pool.disconnect()
            self._sync = None
        await self._client.aclose()
        await self._pool.disconnect()
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()


def _pack(command: Sequence[Any]) -> bytes:
    """One command in RESP, as one buffer: the lean path sends only str, bytes and numbers, and
    this costs a third of redis-py's general-purpose packer on a hit."""
    parts = [b"*%d\r\n" % len(command)]
    for argument in command:
        kind = type(argument)
        if kind is str:
            data = argument.encode()
        elif kind is bytes:
            data = argument
        elif kind is int:
            data = b"%d" % argument
        elif kind is float:
            data = repr(argument).encode()
        else:
            raise TypeError(f"cannot send a {kind.__qualname__} to Redis")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _fill_arguments(fill: Fill) -> tuple[list[str], list[Any]]:
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


def _bump_arguments(
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


class _Deadline:
    """The operation timeout of one command, which only Redis's silence can exhaust.

    When it expires while the reply is already waiting in the socket, the delay is this process's
    own (a busy event loop under load), not Redis's: the command is given more time, up to
    HARD_DEADLINE_FACTOR timeouts, instead of failing and being counted against the backend.
    """

    def __init__(self, seconds: float, connection: Any) -> None:
        self.seconds = seconds
        self.connection = connection
        self._timeout: Any = None
        self._check: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> _Deadline:
        loop = asyncio.get_running_loop()
        self._hard = loop.time() + self.seconds * HARD_DEADLINE_FACTOR
        self._timeout = _timeout_context()
        await self._timeout.__aenter__()
        self._check = loop.call_at(loop.time() + self.seconds, self._expire)
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        if self._check is not None:
            self._check.cancel()
        return await self._timeout.__aexit__(*exc)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._hard and _reply_waiting(self.connection):
            self._check = loop.call_at(loop.time() + self.seconds, self._expire)
        else:
            self._timeout.reschedule(loop.time())


HARD_DEADLINE_FACTOR = 20


def _timeout_context() -> Any:
    """An open-ended `asyncio.timeout` (or async_timeout's before 3.11), rescheduled on expiry."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is not None:
        return timeout(None)
    import async_timeout  # type: ignore[import-not-found]  # redis-py's dependency on 3.10

    return async_timeout.timeout(None)


def _reply_waiting(connection: Any) -> bool:
    """Whether bytes from Redis are readable on this connection's socket (never consumed)."""
    try:
        sock = connection._writer.transport.get_extra_info("socket")
        readable, _, _ = select.select([sock], [], [], 0)
    except Exception:
        return False
    return bool(readable)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def make_store(backend: BackendConfig, operation_timeout: float) -> Store:
    if backend.is_memory:
        return MemoryStore(
            size=int(backend.options.get("size", 10_000)),
            max_bytes=int(backend.options.get("max_bytes", 256 * 1024 * 1024)),
        )
    if backend.cluster:
        from .cluster_store import ClusterStore

        return ClusterStore(backend, operation_timeout)
    return RedisStore(backend, operation_timeout)
