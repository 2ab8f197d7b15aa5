"""What the breaker, the epoch check, `bind()` and operators ask of a Redis Cluster, off the hot
path: warm-up, the probe's ping, the identity of the cluster's data, the cluster-mode check,
scanning every master, closing. `ClusterStore` adds the operations on top of this.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .._greenlet import await_, in_greenlet
from ..redis_errors import require_cluster_mode
from .cluster_nodes import ClusterNodes, joined, plain_options, run_id
from .redis import WARM_CONNECTIONS, delete_matching_async
from .resp import glob_escape


class ClusterHealth(ClusterNodes):
    """Warm-up, probe, identity, mode check, scans and closing of one cluster store."""

    _meta_slot: int | None
    meta_key: str | None

    def subscriber_nodes(self) -> list[tuple[str, int]]:
        """Nodes a pub/sub subscriber may connect to, the startup nodes first, then every node the
        topology has named (masters and replicas alike: a cluster forwards classic pub/sub
        messages to every node), so a subscriber whose node died moves to another."""
        nodes = list(self._startup)
        for state in self._loops.values():
            with contextlib.suppress(Exception):
                for node in list(state.client.nodes_manager.nodes_cache.values()):
                    nodes.append((node.host, int(node.port)))
        return list(dict.fromkeys(nodes))

    def warm_up(self) -> None:
        """Learn the topology and open a few connections to every master now."""
        if in_greenlet():
            await_(self._warm_up_async())
        else:
            self._sync_client().ping(target_nodes="primaries")

    async def _warm_up_async(self) -> None:
        manager = await self._topology()
        addresses = {
            (n.host, int(n.port))
            for n in manager.nodes_cache.values()
            if n.server_type == "primary"
        }
        groups = [((address, False), [("PING",)]) for address in sorted(addresses)]
        # several connections per master, opened together: the first burst of requests then
        # finds working connections instead of all connecting at once on a busy event loop
        await asyncio.gather(*(self._round(groups) for _ in range(WARM_CONNECTIONS)))

    def delete_entries(self, pattern_prefix: str) -> int:
        """SCAN every master (entries are spread over all of them) and unlink what matches."""
        match = glob_escape(pattern_prefix) + "*"
        if in_greenlet():
            return await_(self._full(lambda c: delete_matching_async(c, match)))
        client = self._sync_client()
        deleted = 0
        for key in list(client.scan_iter(match=match, count=1000)):
            deleted += client.unlink(key)
        return deleted

    def count_keys(self, pattern_prefix: str) -> int:
        match = glob_escape(pattern_prefix) + "*"
        if in_greenlet():
            return await_(self._full(lambda c: _count_matching_async(c, match)))
        return sum(1 for _ in self._sync_client().scan_iter(match=match, count=1000))

    def ping(self) -> None:
        """After a topology refresh, the meta slot's master answers (every master, before the
        meta slot is known): the breaker's probe closes once invalidations can be delivered
        again; entry nodes that are still down only cost their entries (see `fetch_async`)."""
        if in_greenlet():
            await_(self._ping_async())
        else:
            client = self._sync_client()
            client.nodes_manager.initialize()
            client.ping(target_nodes="primaries")

    async def _ping_async(self) -> None:
        self._refresh_now()
        manager = await self._topology()
        slots = manager.slots_cache
        if self._meta_slot is not None and slots.get(self._meta_slot):
            # the meta slot's master is what invalidations need; entry nodes may be down
            slots = {self._meta_slot: slots[self._meta_slot]}
        addresses = {tuple(nodes[0].name.rsplit(":", 1)) for nodes in slots.values()}
        await self._round(
            [(((host, int(port)), False), [("PING",)]) for host, port in sorted(addresses)]
        )

    def server_id(self) -> str | None:
        """An identity of the cluster's data that changes when a master restarted or was
        replaced: then the namespace moves to a new epoch (the manager compares identities).

        Only the master of the meta slot holds data that can validate entries: an entry lost on
        another master is a miss, and one restored there from an old snapshot carries a stamp that
        current versions never match. So once `bind_namespace` named the meta slot, the identity
        is that master's run id, and failovers of the other masters move nothing. Without it,
        the identity is the run ids of every master: any failover or restart then costs one epoch
        move (every entry misses once), never a stale read. A clean failover of the meta slot's
        master also moves the epoch once; that is what makes an unclean one safe, where the
        replica may lack the old master's last writes (bumps themselves wait for a replica).
        """
        if in_greenlet():
            return await_(self._server_id_async())
        client = self._sync_client()
        client.nodes_manager.initialize()  # who is master now, not who was
        if self.meta_key is not None:
            node = client.get_node_from_key(self.meta_key)
            return run_id(client.get_redis_connection(node).info("server"))
        replies = client.info("server", target_nodes="primaries")
        infos = replies.values() if "run_id" not in replies else [replies]
        return joined(run_id(info) for info in infos)

    async def _server_id_async(self) -> str | None:
        self._refresh_now()  # who is master now, not who was
        if self.meta_key is not None:
            (replies,) = await self._run([(self.meta_key, [("INFO", "server")])])
            return run_id(replies[0])
        manager = await self._topology()
        primaries = sorted({(n[0].host, int(n[0].port)) for n in manager.slots_cache.values()})
        try:
            replies = await self._round(
                [((address, False), [("INFO", "server")]) for address in primaries]
            )
        except Exception:
            # A master that does not answer (its replica not yet promoted) must not hold up
            # the redelivery of invalidations, which need only the meta slot: no identity this
            # time; the next check compares again.
            return None
        return joined(run_id(reply[0]) for reply in replies)

    def bind_namespace(self, meta_key: str) -> None:
        """Name a key of the meta slot (e.g. the namespace's epoch key): `server_id` then follows
        only that slot's master. Call it once, before the first `server_id`."""
        self.meta_key = meta_key
        self._meta_slot = self._slot(meta_key)

    def check_config(self) -> None:
        """Raise `ConfigError` if the server named by the URL is not a cluster node; None if it
        is, or if it cannot be reached (that is an outage, reported by the breaker)."""
        if in_greenlet():
            await_(self._check_config_async())
        else:
            import redis

            host, port = self._startup[0]
            client = redis.Redis(host=host, port=port, **plain_options(self._options, self._url))
            try:
                info = client.info("cluster")
            except redis.RedisError:  # an outage, or a mistake the guarded calls will name
                return
            finally:
                client.close()
            require_cluster_mode(info, self._url, wanted=True)

    async def _check_config_async(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        host, port = self._startup[0]
        client = aioredis.Redis(host=host, port=port, **plain_options(self._options, self._url))
        try:
            info = await client.info("cluster")
        except RedisError:  # an outage, or a mistake the guarded calls will name
            return
        finally:
            await client.aclose()
        require_cluster_mode(info, self._url, wanted=True)

    def close(self) -> None:
        if self._sync is not None:
            with contextlib.suppress(Exception):
                self._sync.close()
            self._sync = None
        if in_greenlet():
            await_(self.aclose())

    async def aclose(self) -> None:
        if self._sync is not None:
            with contextlib.suppress(Exception):
                self._sync.close()
            self._sync = None
        current = asyncio.get_running_loop()
        for loop, state in self._loops.take_all():  # another loop's state goes with its loop
            if loop is current:
                await state.aclose()


async def _count_matching_async(client: Any, match: str) -> int:
    return len([k async for k in client.scan_iter(match=match, count=1000)])
