"""The in-process tier: recent entries kept decoded, served with no Redis round trip while a local
mirror of the version keys, kept current over Redis pub/sub, says they are still valid.

    read: mirror fresh? -> local entry? -> every stamp token == mirror token? -> hit (0 commands)
    else: Redis as without the tier; afterwards `remember()` learns the versions read and keeps
    the entry

Every version bump publishes its new token in the same script as the bump (lua/bump.lua), on the
channel `{prefix}:inv:{db}`. One subscriber thread per cache applies those messages to the mirror.

Why no stale local hit is possible
----------------------------------
A local hit needs (a) the entry's stamp equal to the mirror for every key it read, and (b) the
mirror *fresh*: complete up to at most `heartbeat` seconds ago.

1. The mirror only ever holds a token that was current at a known point of Redis's own order, and
   every later bump of that key reaches it through the subscription:
   - tokens from messages: Redis delivers one connection's messages in the order it executed the
     PUBLISHes, so applying them in arrival order replays the bumps in order;
   - tokens learned from a read (`learn`): the read's MGET ran at Redis time T_m. A bump after T_m
     is published after T_m; it reaches the mirror if the subscription was active at Redis before
     T_m. That is known when the subscribe confirmation had arrived before the MGET was sent,
     i.e. the *epoch* (incremented at every (re)subscription and every drop) seen before the read
     is live and unchanged after it. A bump after T_m applied *before* the learn happens got a
     sequence number above the one taken before the MGET (`mark`), so the learn refuses that key;
     applied *after* the learn, it overwrites the learned value. Either way the mirror ends on the
     newest token. Keys evicted from the bounded mirror leave a watermark that refuses learns
     older than their last change.
2. A subscription that lost messages is detected: a disconnect ends the session (the epoch moves,
   the mirror is emptied); an unexpected subscribe confirmation (redis-py resubscribing on its own)
   counts as a disconnect. A silent connection (blackholed) cannot be noticed by its silence alone,
   hence the heartbeat: the thread publishes a numbered heartbeat on its own channel every
   `heartbeat / 4` and records when it sent it. When heartbeat n comes back, every PUBLISH Redis
   executed before it - so every bump executed before it was *sent* - has been applied (same
   connection, same order). `confirmed_at` is that send time, and (b) requires
   `now - confirmed_at <= heartbeat`: a bump that executed more than `heartbeat` seconds ago is
   always in the mirror, whatever the network does. The check is made at every local read; the
   thread additionally drops the mirror and resubscribes when a heartbeat is overdue.
3. This process's own commits: before `commit()` returns, the keys it bumped are marked unknown
   (no local hit on them) and, if the subscription was live before the bump was sent, *pending*
   its own message: messages for that key that arrive before it are older (ignored) and the own
   message installs the new token. The subscriber thread may be quicker than the committer: if
   the own message was already delivered (it is the key's token, or among the last pairs the
   stream delivered), the key is left as it is: as current as the stream. Otherwise, if the own
   message is missed by that memory, the key stays unknown and the next heartbeat sent after the
   commit (which proves the own message was delivered) ends the wait. If the bump failed or its
   fate is unknown the key just stays unknown until a later read learns it under (1).
4. Nothing is served locally while the circuit breaker is open (an undelivered invalidation must
   be redelivered first), nor for a model configured with `"local": False`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .mirror import TAGS, VERSIONS, Mark, Mirror

logger = logging.getLogger("sqlacache")


@dataclass
class LocalEntry:
    keys: tuple[str, ...]
    tokens: tuple[bytes, ...]
    snapshot: Any  # decoded on first local use when only the payload is known
    payload: bytes | None
    expires_at: float
    size: int


class LocalTier:
    """Decoded entries (LRU, bounded by count and bytes), the mirror, and the subscriber thread."""

    def __init__(
        self,
        *,
        size: int,
        max_bytes: int,
        heartbeat: float,
        url: str,
        options: dict[str, Any],
        channel: str,
        strip: str,
        serving: Callable[[], bool],
        nodes: Callable[[], list[tuple[str, int]]] | None = None,
    ) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.mirror = Mirror(heartbeat, limit=max(size * 8, 100_000))
        self.channel = channel
        self.strip = strip  # the common key prefix lua/bump.lua strips from published keys
        self.serving = serving  # False while the circuit breaker is open
        self._entries: OrderedDict[str, LocalEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.started = False
        self.subscriber = Subscriber(self, url, options, nodes)
        #: called with the tags of a cashews deletion published by another process
        self.on_tags: Callable[[list[str]], None] | None = None
        #: called when the subscription was lost and is live again (messages may be missing)
        self.on_gap: Callable[[], None] | None = None

    def start(self) -> None:
        self.started = True
        self.subscriber.start_once()
        _watch_forks(self)

    def after_fork(self) -> None:
        """In a forked child (a pre-forking server that bound before forking): the parent's
        thread is gone and its mirror proves nothing here. Restarted by the next Redis read."""
        # a lock the parent's thread held at the fork would stay held forever in the child
        self.mirror.lock = threading.Lock()
        self._lock = threading.Lock()
        self.mirror.drop()
        self.subscriber.forget_thread()
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stop(self) -> None:
        self.started = False
        self.subscriber.stop()
        _TIERS.discard(self)
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        self.mirror.drop()

    # -- the read path ----------------------------------------------------------------------------

    def lookup(
        self, entry_key: str, version_keys: Sequence[str], decode: Callable[[bytes], Any]
    ) -> Any:
        """The decoded snapshot of a valid local entry, or None (go to Redis)."""
        mirror = self.mirror
        if not mirror.fresh() or not self.serving():
            return None
        with self._lock:
            entry = self._entries.get(entry_key)
            if entry is None:
                return None
            if entry.expires_at <= time.monotonic() or entry.keys != tuple(version_keys):
                self._drop(entry_key)
                return None
            self._entries.move_to_end(entry_key)
        if not mirror.matches(entry.keys, entry.tokens):
            return None
        snapshot = entry.snapshot
        if snapshot is None:
            assert entry.payload is not None
            snapshot = decode(entry.payload)
            if snapshot is None:
                with self._lock:
                    self._drop(entry_key)
                return None
            entry.snapshot, entry.payload = snapshot, None
        self.hits += 1
        return snapshot

    def remember(
        self,
        mark: Mark | None,
        entry_key: str,
        version_keys: Sequence[str],
        versions: Sequence[bytes | None],
        *,
        snapshot: Any = None,
        payload: bytes | None = None,
        ttl: float,
        size: int,
    ) -> None:
        """After a Redis read (hit or fill): learn the versions it read, keep the entry."""
        if mark is not None:
            self.mirror.learn(mark, version_keys, versions)
        if None in versions or size > self.max_bytes:
            return
        entry = LocalEntry(
            tuple(version_keys),
            tuple(versions),  # type: ignore[arg-type]
            snapshot,
            payload,
            time.monotonic() + ttl,
            size,
        )
        with self._lock:
            self._drop(entry_key)
            self._entries[entry_key] = entry
            self._bytes += size
            while self._entries and (
                len(self._entries) > self.size or self._bytes > self.max_bytes
            ):
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.size

    def _drop(self, entry_key: str) -> None:
        old = self._entries.pop(entry_key, None)
        if old is not None:
            self._bytes -= old.size

    # -- the write path ---------------------------------------------------------------------------

    def mark(self) -> Mark | None:
        if self.started and not self.subscriber.running:
            self.subscriber.start_once()  # after a fork
        return self.mirror.mark()

    def bumped(self, mark: Mark | None, token: bytes | None, keys: Sequence[str]) -> None:
        """This process bumped `keys` with `token` (None: failed or unknown); before commit returns."""
        if keys:
            self.mirror.apply_own(mark, token, keys)

    # -- the stream -------------------------------------------------------------------------------

    def on_message(self, epoch: int, data: bytes) -> None:
        kind = data[:1]
        if kind == VERSIONS:
            head, _, body = data.partition(b"\n")
            token = head[1:]
            strip = self.strip
            keys = [strip + k.decode() for k in body.split(b"\n")] if body else []
            self.mirror.apply(epoch, token, keys)
        elif kind == TAGS and self.on_tags is not None:
            head, _, body = data.partition(b"\n")
            if head[1:].decode() != self.subscriber.sender:
                self.on_tags([t.decode() for t in body.split(b"\n") if t])

    def stats(self) -> dict[str, Any]:
        mirror = self.mirror
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "hits": self.hits,
            "live": mirror.live,
            "fresh": mirror.fresh(),
            "mirror_keys": len(mirror.tokens),
            "drops": mirror.drops,
            "subscriptions": self.subscriber.subscriptions,
        }


class Subscriber:
    """One thread per cache, with its own sync redis-py connections: a pub/sub connection and one
    for heartbeats.

    A thread rather than a task on the application's event loop: the mirror serves every loop and
    thread of the process (several loops, loops that close), and heartbeats keep their
    rhythm while an event loop is busy with CPU work - a late heartbeat would only make the tier
    stop serving, but a missed one must never be mistaken for a healthy connection.
    """

    def __init__(
        self,
        tier: LocalTier,
        url: str,
        options: dict[str, Any],
        nodes: Callable[[], list[tuple[str, int]]] | None = None,
    ) -> None:
        self.tier = tier
        self.url = url
        self.options = options
        #: on a cluster, the nodes to subscribe on, tried in turn: one that died is left for the
        #: next (every node carries every message)
        self.nodes = nodes
        self._turn = 0
        self.sender = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.heartbeat_channel = f"{tier.channel}:hb:{self.sender}"
        self.subscriptions = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._client: Any = None

    def start_once(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlacache-subscriber-{self.tier.channel}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def forget_thread(self) -> None:
        self._thread = None

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except Exception as exc:
                logger.debug("sqlacache: local tier subscription ended: %s", exc)
            self.tier.mirror.drop()
            self._turn += 1  # on a cluster, the next attempt goes to the next node
            if time.monotonic() - started > 5.0:
                delay = 0.05
            self._stop.wait(delay)
            delay = min(delay * 2, 1.0)

    def _redis(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        heartbeat = self.tier.mirror.heartbeat
        options = dict(self.options)
        options.update(
            socket_timeout=max(min(heartbeat / 2, 1.0), 0.05),
            socket_connect_timeout=max(min(heartbeat, 1.0), 0.1),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=False,
            protocol=2,
        )
        for unwanted in ("max_connections", "pool_timeout"):
            options.pop(unwanted, None)
        nodes = self.nodes() if self.nodes is not None else []
        if nodes:
            host, port = nodes[self._turn % len(nodes)]
            return redis.Redis(host=host, port=port, **options)
        return redis.Redis.from_url(self.url, **options)

    def _session(self) -> None:
        """Subscribe, go live, then apply messages and heartbeat until something is in doubt."""
        tier, mirror = self.tier, self.tier.mirror
        heartbeat = mirror.heartbeat
        interval = heartbeat / 4
        client = self._redis()
        pubsub = client.pubsub()
        try:
            subscribe_sent = time.monotonic()
            pubsub.subscribe(tier.channel, self.heartbeat_channel)
            confirmed: set[bytes] = set()
            deadline = subscribe_sent + max(heartbeat, 1.0)
            while len(confirmed) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("no subscribe confirmation")
                message = pubsub.get_message(timeout=interval)
                if message is not None and message["type"] == "subscribe":
                    confirmed.add(message["channel"])
            # everything published after the SUBSCRIBE ran reaches us, in order
            epoch = mirror.go_live(subscribe_sent)
            self.subscriptions += 1
            if self.subscriptions > 1 and tier.on_gap is not None:
                tier.on_gap()
            sent: dict[int, float] = {}
            number = 0
            next_beat = time.monotonic()
            hb_channel = self.heartbeat_channel.encode()
            while not self._stop.is_set():
                now = time.monotonic()
                if sent and now - min(sent.values()) > heartbeat:
                    raise TimeoutError(f"a heartbeat did not come back within {heartbeat}s")
                if now >= next_beat:
                    number += 1
                    sent[number] = time.monotonic()
                    client.publish(self.heartbeat_channel, str(number))
                    next_beat = now + interval
                message = pubsub.get_message(timeout=max(next_beat - time.monotonic(), 0.001))
                if message is None:
                    continue
                kind = message["type"]
                if kind != "message":
                    if kind in ("subscribe", "unsubscribe"):
                        raise ConnectionError("the subscription was renewed: messages may be lost")
                    continue
                if message["channel"] == hb_channel:
                    seq = int(message["data"])
                    for old in [n for n in sent if n <= seq]:
                        at = sent.pop(old)
                        if old == seq:
                            mirror.confirm(epoch, at)
                else:
                    tier.on_message(epoch, message["data"])
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()
            with contextlib.suppress(Exception):
                client.close()


_TIERS: weakref.WeakSet[LocalTier] = weakref.WeakSet()
_fork_hook: list[bool] = []


def _watch_forks(tier: LocalTier) -> None:
    """Registered once, at the first tier started (no work at import)."""
    _TIERS.add(tier)
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook.append(True)


def _after_fork_in_child() -> None:
    for tier in list(_TIERS):
        tier.after_fork()
