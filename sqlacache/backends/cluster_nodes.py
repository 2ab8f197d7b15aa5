"""The nodes of a Redis Cluster as `ClusterStore` uses them: the topology (which master serves
which slot, refreshed after a failure), lean connections per node, and one round of command
groups sent to every node before any reply is read, following MOVED, ASK and TRYAGAIN.

`ClusterStore` builds its operations on this; its `__init__` sets the attributes declared here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .._greenlet import await_, in_greenlet
from ..loops import LoopLocal
from .resp import Deadline, PoolExhausted, pack

T = TypeVar("T")

#: Redirections (MOVED, ASK) and TRYAGAIN answers one operation follows before it gives up.
MAX_REDIRECTS = 5
#: Pause before repeating a command the cluster answered TRYAGAIN (a slot migrating its keys).
TRYAGAIN_PAUSE = 0.005
#: A topology refresh after a failure runs at most this often.
REFRESH_INTERVAL = 0.25


class ClusterLoopState:
    """A cluster store's asyncio side on one event loop: redis-py's cluster client, the gate,
    the lean connections per node, the fills being stored. asyncio connections, semaphores and
    futures work only on the loop that made them, so each loop gets its own (see `LoopLocal`)."""

    def __init__(
        self,
        url: str,
        startup: list[tuple[str, int]],
        cluster_options: dict[str, Any],
        max_connections: int,
    ) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(host, port) for host, port in startup]
        self.client = RedisCluster.from_url(url, startup_nodes=nodes, **cluster_options)
        self.gate = asyncio.Semaphore(max_connections)
        self.idle: dict[
            tuple[str, int], list[Any]
        ] = {}  # lean connections per node, last used first
        self.ready = False  # the client's topology is loaded
        self.landing: dict[str, asyncio.Future[None]] = {}  # entries being SET by this process

    async def aclose(self) -> None:
        idle, self.idle = self.idle, {}
        for connections in idle.values():
            for connection in connections:
                with contextlib.suppress(Exception):
                    await connection.disconnect()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class ClusterNodes:
    """Topology and per-node connections of one cluster store."""

    operation_timeout: float
    _loops: LoopLocal[ClusterLoopState]
    _cluster_options: dict[str, Any]
    _options: dict[str, Any]
    _pool_timeout: float
    _refresh_due: bool
    _refreshed_at: float
    _replica_counts: dict[tuple[str, int], int]
    _sources: dict[str, str]
    _startup: list[tuple[str, int]]
    _sync: Any
    _sync_scripts: dict[str, Any]
    _url: str

    @property
    def _client(self) -> Any:
        return self._loops.get().client

    @property
    def _gate(self) -> asyncio.Semaphore:
        return self._loops.get().gate

    @property
    def _idle(self) -> dict[tuple[str, int], list[Any]]:
        return self._loops.get().idle

    @property
    def _landing(self) -> dict[str, asyncio.Future[None]]:
        return self._loops.get().landing

    @property
    def _ready(self) -> bool:
        return self._loops.get().ready

    @_ready.setter
    def _ready(self, value: bool) -> None:
        self._loops.get().ready = value

    # -- topology -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        return self._client

    async def _topology(self) -> Any:
        """The nodes manager, initialised, and refreshed if a failure asked for it."""
        if not self._ready:
            await self._client.initialize()
            self._ready = True
            self._refreshed_at = time.monotonic()
        elif self._refresh_due and time.monotonic() - self._refreshed_at > REFRESH_INTERVAL:
            self._refresh_due = False
            self._refreshed_at = time.monotonic()
            try:
                await self._client.nodes_manager.initialize()
            except Exception:
                # Nodes may disagree while a failover settles: keep the map we have (the
                # operation itself tells whether it still holds) and try again later.
                self._refresh_due = True
        return self._client.nodes_manager

    def _mark_failed(self) -> None:
        self._refresh_due = True
        self._replica_counts.clear()

    def _refresh_now(self) -> None:
        """The next operation reloads the topology whatever the rate limit says."""
        self._refresh_due = True
        self._refreshed_at = 0.0

    def _primary(self, manager: Any, slot: int) -> tuple[str, int]:
        nodes = manager.slots_cache.get(slot)
        if not nodes:
            from redis.exceptions import SlotNotCoveredError

            self._mark_failed()
            raise SlotNotCoveredError(f"slot {slot} is not covered by the cluster")
        return nodes[0].host, int(nodes[0].port)

    @staticmethod
    def _slot(key: str) -> int:
        return key_slot(key)

    # -- lean connections -------------------------------------------------------------------------

    async def _enter_gate(self) -> asyncio.Semaphore:
        gate = self._gate
        if gate.locked():
            try:
                await asyncio.wait_for(gate.acquire(), self._pool_timeout)
            except asyncio.TimeoutError:
                raise PoolExhausted(f"no Redis connection within {self._pool_timeout}s") from None
        else:
            await gate.acquire()
        return gate

    async def _connection(self, address: tuple[str, int]) -> Any:
        """An idle lean connection to the node, or a new one."""
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if connection.is_connected:
                return connection
        return await self._open(address)

    async def _open(self, address: tuple[str, int]) -> Any:
        """A new lean connection: no socket timeout of its own (the operation deadline bounds
        its commands), no retries; connecting has the connect timeout."""
        from redis.asyncio.connection import Connection, SSLConnection, parse_url
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kwargs = {
            key: value
            for key, value in self._options.items()
            if key not in ("max_connections", "socket_timeout")
        }
        secure = self._url.startswith("rediss://")
        connection_class: Any = SSLConnection if secure else Connection
        credentials = {
            key: value
            for key, value in parse_url(self._url).items()
            if key in ("username", "password")
        }
        connection = connection_class(
            host=address[0],
            port=address[1],
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
            **credentials,
            **kwargs,
        )
        try:
            await connection.connect()
        except BaseException:
            await connection.disconnect(nowait=True)  # a connect cut short leaves no socket
            raise
        return connection

    def _give_back(self, address: tuple[str, int], connection: Any) -> None:
        self._idle.setdefault(address, []).append(connection)

    async def _run(
        self, requests: Sequence[tuple[str, Sequence[Sequence[Any]]]], extra: float = 0.0
    ) -> list[list[Any]]:
        """Run groups of commands, each group routed by its key's slot.

        Every group is sent before any reply is read, so groups on different nodes run
        concurrently: the whole call costs one round trip. A group answered MOVED, ASK or
        TRYAGAIN is sent again where the cluster says (ASKING first for ASK), up to
        MAX_REDIRECTS times. Returns each group's replies in order.
        """
        errors = redis_errors()
        manager = await self._topology()
        first = [((self._primary(manager, key_slot(key)), False), group) for key, group in requests]
        replies = await self._round(first, extra)
        if not any(isinstance(r, errors.ResponseError) for group in replies for r in group):
            return replies  # the usual case: no redirection, no error reply
        results: list[list[Any] | None] = [None] * len(requests)
        targets = {index: target for index, (target, _) in enumerate(first)}
        for attempt in range(MAX_REDIRECTS + 1):
            if attempt:
                replies = await self._round(
                    [(targets[i], requests[i][1]) for i in sorted(targets)], extra
                )
            again: dict[int, tuple[tuple[str, int], bool]] = {}
            pause = False
            for index, group_replies in zip(sorted(targets), replies, strict=True):
                redirect = next(
                    (r for r in group_replies if isinstance(r, errors.redirections)), None
                )
                if isinstance(redirect, errors.MovedError):
                    await manager.move_slot(redirect)
                    key = requests[index][0]
                    again[index] = (self._primary(manager, key_slot(key)), False)
                elif isinstance(redirect, errors.AskError):
                    again[index] = ((redirect.host, int(redirect.port)), True)
                elif any(isinstance(r, errors.TryAgainError) for r in group_replies):
                    again[index] = targets[index]
                    pause = True
                else:
                    for reply in group_replies:
                        # NOSCRIPT is left to the caller, which sends the script itself
                        if isinstance(reply, errors.ResponseError) and not isinstance(
                            reply, errors.NoScriptError
                        ):
                            raise reply
                    results[index] = group_replies
            if not again:
                return [r for r in results if r is not None]
            targets = again
            if pause:
                await asyncio.sleep(TRYAGAIN_PAUSE)
        raise errors.ClusterError(f"still redirected after {MAX_REDIRECTS} tries")

    async def _round(
        self,
        groups: Sequence[tuple[tuple[tuple[str, int], bool], Sequence[Sequence[Any]]]],
        extra: float = 0.0,
    ) -> list[list[Any]]:
        """Send every group, then read every reply, within one operation timeout (plus `extra`:
        the time a WAIT may take on the server).

        Groups bound for the same node share one connection and one write: a hit whose entry
        lives on the meta slot's node costs what it costs on a single Redis. A group sent after
        an ASK redirection keeps a connection of its own (ASKING applies to the next command).
        """
        response_error = redis_errors().ResponseError
        batches = _batches(groups)
        gate = await self._enter_gate()
        taken: list[Any] = []
        current: tuple[str, int] | None = None  # the node a failure is blamed on
        try:
            # connecting has its own timeout; the deadline bounds sending and replies
            for address, _, _ in batches:
                current = address
                taken.append(await self._connection(address))
            async with Deadline(self.operation_timeout + extra, taken[0]) as deadline:
                for (address, asking, members), connection in zip(batches, taken, strict=True):
                    current = address
                    prefix: tuple[tuple[Any, ...], ...] = (("ASKING",),) if asking else ()
                    commands = [c for index in members for c in groups[index][1]]
                    packed = b"".join(pack(command) for command in (*prefix, *commands))
                    await connection.send_packed_command(packed, check_health=False)
                out: list[list[Any]] = [[] for _ in groups]
                for (address, asking, members), connection in zip(batches, taken, strict=True):
                    current = address
                    deadline.connection = connection
                    read = connection.read_response
                    if asking:
                        with contextlib.suppress(response_error):
                            await read()  # ASKING's OK
                    for index in members:
                        replies = out[index]
                        for _ in groups[index][1]:
                            try:
                                replies.append(await read())
                            except response_error as exc:  # a whole reply: the connection is fine
                                replies.append(exc)
        except BaseException as exc:
            self._mark_failed()
            if isinstance(exc, Exception):
                exc.sqlacache_node = current  # type: ignore[attr-defined]
            for connection in taken:
                with contextlib.suppress(Exception):
                    await connection.disconnect()
            raise
        finally:
            gate.release()
        for (address, _, _), connection in zip(batches, taken, strict=True):
            self._give_back(address, connection)
        return out

    def _call(self, command: Callable[[Any], Awaitable[T]], sync: Callable[[Any], T]) -> T:
        """Run an off-the-hot-path command on redis-py's cluster client (async or sync)."""
        if in_greenlet():
            return await_(self._full(command))
        return sync(self._sync_client())

    async def _full(self, command: Callable[[Any], Awaitable[T]]) -> T:
        await self._topology()
        gate = await self._enter_gate()
        try:
            return await command(self._client)
        except BaseException:
            self._mark_failed()
            raise
        finally:
            gate.release()

    def _sync_client(self) -> Any:
        if self._sync is None:
            from redis.cluster import ClusterNode, RedisCluster

            options = {
                k: v
                for k, v in self._cluster_options.items()
                if k not in ("retry", "max_connections")
            }
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._sync = RedisCluster.from_url(
                self._url,
                startup_nodes=[ClusterNode(host, port) for host, port in self._startup],
                retry=Retry(NoBackoff(), 0),
                **options,
            )
            self._sync_scripts = {
                name: self._sync.register_script(source) for name, source in self._sources.items()
            }
        return self._sync


@functools.lru_cache(maxsize=4096)
def key_slot(key: str) -> int:
    """The cluster slot of a key (its hash tag's, if it has one). Memoised: a hit names the
    same meta keys every time and the same entry keys again and again."""
    from redis.crc import key_slot as slot_of

    return int(slot_of(key.encode()))


@functools.cache
def redis_errors() -> Any:
    """redis-py's exception classes the hot path tells apart, imported once (redis-py is an
    optional dependency, so not at module level)."""
    from redis import exceptions

    class Errors:
        AskError = exceptions.AskError
        ClusterError = exceptions.ClusterError
        MovedError = exceptions.MovedError
        NoScriptError = exceptions.NoScriptError
        ResponseError = exceptions.ResponseError
        TryAgainError = exceptions.TryAgainError
        redirections = (exceptions.MovedError, exceptions.AskError)

    return Errors


def _batches(
    groups: Sequence[tuple[tuple[tuple[str, int], bool], Sequence[Sequence[Any]]]],
) -> list[tuple[tuple[str, int], bool, list[int]]]:
    """The connections one round needs: (node, after ASK, indexes of the groups it carries).
    Groups for the same node share one; a group after an ASK redirection gets its own."""
    batches: list[tuple[tuple[str, int], bool, list[int]]] = []
    by_node: dict[tuple[str, int], list[int]] = {}
    for index, ((address, asking), _) in enumerate(groups):
        members = None if asking else by_node.get(address)
        if members is None:
            members = []
            batches.append((address, asking, members))
            if not asking:
                by_node[address] = members
        members.append(index)
    return batches


def connected_replicas(info: Any) -> int:
    """`connected_slaves` of an INFO replication reply (a dict, or raw text)."""
    if isinstance(info, dict):
        return int(info.get("connected_slaves", 0))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("connected_slaves:"):
            return int(line.split(":", 1)[1])
    return 0


def url_node(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def run_id(info: Any) -> str | None:
    """The run_id in an INFO reply (parsed into a dict, or raw text)."""
    if isinstance(info, dict):
        value = info.get("run_id")
        return None if value is None else str(value)
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return None


def joined(run_ids: Any) -> str | None:
    ids = list(run_ids)
    return None if not ids or None in ids else ",".join(sorted(ids))


def plain_options(options: dict[str, Any], url: str) -> dict[str, Any]:
    """Options of a one-off client to the URL's own node: no retries (an outage answers fast)."""
    from redis.backoff import NoBackoff
    from redis.connection import parse_url
    from redis.retry import Retry

    keep = ("socket_timeout", "socket_connect_timeout", "protocol", "username", "password")
    out: dict[str, Any] = {k: v for k, v in options.items() if k in keep}
    out["retry"] = Retry(NoBackoff(), 0)
    for name, value in parse_url(url).items():
        if name in ("username", "password"):
            out.setdefault(name, value)
    if url.startswith("rediss://"):
        out["ssl"] = True
    return out
