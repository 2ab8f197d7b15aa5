"""Never down: every store call goes through a circuit breaker, and recovery redelivers what was lost.

A failed call costs at most the backend's operation timeout. After `threshold` consecutive
failures, or at once when an invalidation could not be delivered, the breaker opens: the cache is
skipped entirely until a background probe finds the backend answering *and* every queued
invalidation has been redelivered. One WARNING when it opens, one INFO when it closes.

A failure counts only if no other call succeeded while it was in flight. A dead or blackholed
backend answers nobody, so it still opens the breaker; a busy event loop during a burst makes some
calls miss their timeout while others succeed, and that must not switch the cache off under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from ._greenlet import greenlet_spawn
from .backends.base import Bump, Fill, Store
from .backends.resp import is_pool_exhausted
from .errors import CacheUnavailable
from .keys import Namespace, new_token
from .stats import Stats

logger = logging.getLogger("sqlacache")
T = TypeVar("T")


class Breaker:
    """Closed: calls go through. Open: calls fail fast until a probe succeeds."""

    MAX_PROBE_INTERVAL = 5.0

    def __init__(self, threshold: int, probe_interval: float, stats: Stats) -> None:
        self.threshold = threshold
        self.probe_interval = probe_interval
        self.stats = stats
        self.is_open = False
        self.failures = 0
        self.last_success = 0.0
        self.opened_at: float | None = None
        self.last_error: str | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._next_inline_probe = 0.0
        #: set by the owner: checks the backend and redelivers queued invalidations, or raises
        self.recover: Callable[[], None] | None = None
        #: set by the owner: whether invalidations wait for redelivery. Until they land, other
        #: processes may serve what they made stale, so the probe then never backs off.
        self.urgent: Callable[[], bool] = lambda: False
        #: set by the owner: the wrong setting named by a failure that says the configuration is
        #: wrong (a bad password, a missing database, an ACL denial), else None
        self.misconfiguration: Callable[[BaseException], str | None] = _no_misconfiguration
        #: the wrong setting the backend's last refusal named; None once it answers again
        self.config_error: str | None = None

    @property
    def state(self) -> str:
        return "open" if self.is_open else "closed"

    def success(self) -> None:
        self.failures = 0
        self.last_success = time.monotonic()

    def failure(self, exc: BaseException, started: float) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.stats.transport_errors += 1
        if self.misconfigured(exc):
            return
        if self.last_success > started:
            return  # the backend answered someone meanwhile: local trouble, not an outage
        self.failures += 1
        if self.failures >= self.threshold:
            self.trip(self.last_error)

    def misconfigured(self, exc: BaseException) -> bool:
        """Whether `exc` says the configuration is wrong; if so the breaker opens at once (this
        never passes by itself) and the mistake is logged as an ERROR, once, naming the setting.
        The probe goes on, so a corrected server (an ACL fixed, a password set) is used again."""
        problem = self.misconfiguration(exc)
        if problem is None:
            return False
        if problem != self.config_error:
            logger.error(
                "sqlacache: the cache backend refuses this configuration: %s; serving from the "
                "database",
                problem,
            )
        self.config_error = problem
        self.trip(problem, quiet=True)
        return True

    def trip(self, reason: str, *, retry_now: bool = False, quiet: bool = False) -> None:
        """Open now (an undelivered invalidation must be redelivered before any cache read).

        `retry_now`: probe at once rather than after `probe_interval`. An invalidation lost to a
        deadline missed under load is usually redelivered within a round trip, and the cache
        need not stay off for the whole interval.
        """
        if not self.is_open:
            self.is_open = True
            self.opened_at = time.monotonic()
            if not quiet:
                logger.warning(
                    "sqlacache: cache backend unavailable (%s); serving from the database", reason
                )
        self._start_probe(0.0 if retry_now else self.probe_interval)

    def close(self) -> None:
        if self.is_open:
            down = time.monotonic() - (self.opened_at or time.monotonic())
            logger.info("sqlacache: cache backend available again after %.1fs; cache resumed", down)
        self.is_open = False
        self.failures = 0
        self.opened_at = None
        self.config_error = None

    def allow(self) -> bool:
        """Whether a call may go to the backend; may run an inline probe when no loop probes."""
        if not self.is_open:
            return True
        if self._probing():
            return False
        if _running_loop() is not None:
            # the probe's loop ended (or never ran it): probe again from this one
            self._start_probe(0.0)
            return False
        now = time.monotonic()
        if now < self._next_inline_probe or self.recover is None:
            return False
        self._next_inline_probe = now + self.probe_interval
        try:
            self.recover()
        except Exception as exc:
            self.misconfigured(exc)
            return False
        self.close()
        return True

    def _probing(self) -> bool:
        """Whether a probe task is pending on a loop that runs it.

        A task belongs to its event loop: one left on a loop that closed or stopped (a second
        `asyncio.run()`, a loop per test) will never run again and must not keep the breaker open.
        """
        task = self._probe_task
        if task is None or task.done():
            return False
        loop = task.get_loop()
        if loop.is_closed() or not loop.is_running():
            self._probe_task = None
            return False
        return True

    def _start_probe(self, first_delay: float) -> None:
        if self._probing():
            return
        loop = _running_loop()
        if loop is None:
            self._next_inline_probe = time.monotonic() + first_delay
            return  # no loop: `allow()` probes inline
        if _being_cancelled():
            return  # its loop may be shutting down: the next `allow()` starts the probe
        self._probe_task = loop.create_task(self._probe_loop(first_delay))

    async def _probe_loop(self, first_delay: float) -> None:
        interval = self.probe_interval
        delay = first_delay
        while self.is_open:
            await asyncio.sleep(delay)
            delay = interval
            try:
                if self.recover is not None:
                    await greenlet_spawn(self.recover)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"  # what stats() shows now
                self.misconfigured(exc)
                interval = (
                    self.probe_interval
                    if self.urgent()
                    else min(interval * 2, self.MAX_PROBE_INTERVAL)
                )
                delay = interval
                continue
            self.close()

    def detach(self) -> None:
        """Forget the parts of a cache being disconnected: no probe runs, nothing waits."""
        self.stop()
        self.recover = None
        self.urgent = lambda: False

    def stop(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is None or task.done():
            return
        loop = task.get_loop()
        if loop.is_closed():
            return  # it can never run again
        if loop is _running_loop():
            task.cancel()
        else:  # another thread's loop: only that loop may touch its tasks
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(task.cancel)


def _no_misconfiguration(exc: BaseException) -> str | None:
    return None


def _being_cancelled() -> bool:
    """Whether the running task is handling its cancellation (Python 3.11+ can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class GuardedStore:
    """The store behind the breaker: every call either succeeds or raises `CacheUnavailable`.

    The cache holds only this wrapper, so no call site can reach the backend around the breaker.
    """

    def __init__(self, store: Store, breaker: Breaker) -> None:
        self.raw = store
        self.breaker = breaker
        self.shared = store.shared
        self.fills_atomically = store.fills_atomically

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        breaker = self.breaker
        if breaker.is_open and not breaker.allow():
            raise CacheUnavailable("circuit breaker open")
        started = time.monotonic()
        try:
            result = fn(*args)
        except CacheUnavailable:
            raise
        except Exception as exc:
            if not is_pool_exhausted(exc):
                breaker.failure(exc, started)
            raise CacheUnavailable(str(exc)) from exc
        breaker.success()
        return result

    async def _run_async(self, make: Callable[[], Awaitable[T]]) -> T:
        breaker = self.breaker
        if breaker.is_open:
            raise CacheUnavailable("circuit breaker open")
        started = time.monotonic()
        try:
            result = await make()
        except Exception as exc:
            if not is_pool_exhausted(exc):
                breaker.failure(exc, started)
            raise CacheUnavailable(str(exc)) from exc
        breaker.success()
        return result

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._run(self.raw.fetch, keys)

    def store(self, fill: Fill) -> None:
        self._run(self.raw.store, fill)

    async def store_async(self, fill: Fill) -> None:
        await self._run_async(lambda: self.raw.store_async(fill))

    def bump(self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int) -> None:
        self._run(self.raw.bump, bump, token, row_ttl_ms, lease_ttl_ms)

    async def bump_async(
        self, bump: Bump, token: bytes, row_ttl_ms: int, lease_ttl_ms: int
    ) -> None:
        await self._run_async(lambda: self.raw.bump_async(bump, token, row_ttl_ms, lease_ttl_ms))

    def publish(self, channel: str, message: bytes) -> None:
        self._run(self.raw.publish, channel, message)

    def delete(self, key: str) -> None:
        self._run(self.raw.delete, key)

    def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool:
        return self._run(self.raw.try_lock, key, token, ttl_ms)

    def unlock(self, key: str, token: bytes) -> None:
        self._run(self.raw.unlock, key, token)

    def add_member(self, key: str, member: str) -> None:
        self._run(self.raw.add_member, key, member)

    def members(self, key: str) -> list[str]:
        return self._run(self.raw.members, key)

    def delete_entries(self, pattern_prefix: str) -> int:
        return self._run(self.raw.delete_entries, pattern_prefix)

    def count_keys(self, pattern_prefix: str) -> int:
        return self._run(self.raw.count_keys, pattern_prefix)

    def warm_up(self) -> None:
        self._run(self.raw.warm_up)

    def server_id(self) -> str | None:
        return self._run(self.raw.server_id)


class Redeliverable(Protocol):
    """What recovery needs from the invalidator (see `invalidation.Invalidator`)."""

    row_ttl_ms: int
    lease_ttl_ms: int
    local: Any  # the in-process tier, or None

    def redeliver(self, send: Callable[[Bump], None]) -> None: ...

    def queue_epoch(self) -> None: ...


class Recovery:
    """What the breaker's probe runs: it succeeds only when the backend answers *and* every queued
    invalidation has been delivered, before any read is served from the cache again.

    It also notices a backend that restarted: one that came back from an old snapshot could hold
    version keys that validate stale entries, so the namespace moves to a new epoch.
    """

    def __init__(
        self,
        store: Store,
        invalidator: Redeliverable,
        namespace: Namespace,
        identities: Callable[[], Iterable[str]],
    ) -> None:
        self.store = store
        self.invalidator = invalidator
        self.namespace = namespace
        self.identities = identities
        self._server_id: str | None = None

    def __call__(self) -> None:
        store, invalidator = self.store, self.invalidator
        store.ping()
        self.check_server(store.server_id())
        invalidator.redeliver(
            lambda bump: store.bump(
                bump, new_token(), invalidator.row_ttl_ms, invalidator.lease_ttl_ms
            )
        )
        if invalidator.local is not None:  # which tokens the redelivery set is unknown here
            invalidator.local.mirror.drop_tokens()
        for identity in self.identities():  # the registry may have been lost with the data
            store.add_member(self.namespace.databases_key, identity)

    def check_server(self, server_id: str | None) -> None:
        if server_id is None:
            return
        if self._server_id is not None and server_id != self._server_id:
            logger.warning("sqlacache: the cache backend restarted; every entry is made stale")
            self.invalidator.queue_epoch()
        self._server_id = server_id
