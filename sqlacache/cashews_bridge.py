"""The cashews bridge: the application's own cashews caches follow the database.

After every COMMIT that wrote rows, and every `invalidate(...)`, the tags `{table}:{pk}` of each
written row (`str()` of the primary key; composite keys joined with `:` in key order) and
`{table}` of each written table are deleted from the configured `cashews.Cache`:

    commit -> Invalidator.complete -> bridge.evict(tags)
        -> this process: `await cache.delete_tags(*tags)`, bounded by the operation timeout
        -> other processes: one PUBLISH on sqlacache's channel; those whose cashews cache lives
           in process memory (mem://) delete the tags themselves (their subscriber thread)

A deletion never fails the commit and never holds it beyond its timeout: a slow deletion goes on in
the background; a failed one (cashews' backend unreachable) keeps its tags pending and is retried
until it succeeds. cashews swallows Redis errors by default (`suppress=True`), so a deletion is
only counted as done once its tags backend also answered a PING.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from ._greenlet import await_, greenlet_spawn, in_greenlet
from .stats import RateLimitedLog

logger = logging.getLogger("sqlacache")

RETRY_FIRST = 0.2
RETRY_MAX = 5.0


def row_tag(table: str, pk: Iterable[Any]) -> str:
    return f"{table}:{':'.join(str(value) for value in pk)}"


def tags_of(tables: Iterable[str], raw_rows: Mapping[str, Iterable[tuple[Any, ...]]]) -> list[str]:
    """The cashews tags a write makes stale: every written table, every written row."""
    tags = set(tables)
    for table, pks in raw_rows.items():
        tags.add(table)
        tags.update(row_tag(table, pk) for pk in pks)
    return sorted(tags)


#: errors cashews logged (and swallowed) during the current deletion, per task
_SWALLOWED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "sqlacache_cashews_swallowed", default=None
)
#: where cashews logs the Redis errors it swallows (pinned by the outage test)
CASHEWS_ERROR_LOGGERS = ("cashews.backends.redis.client",)


class _SwallowedErrors(logging.Filter):
    """Notes an error record in the deletion running in this task; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        swallowed = _SWALLOWED.get()
        if swallowed is not None and record.levelno >= logging.ERROR:
            swallowed.append(record.getMessage())
        return True


_filter = _SwallowedErrors()


def watch_cashews_errors() -> None:
    for name in CASHEWS_ERROR_LOGGERS:
        logger_ = logging.getLogger(name)
        if _filter not in logger_.filters:
            logger_.addFilter(_filter)


def _backends(cache: Any) -> list[Any]:
    """cashews keeps its backends by prefix in `_backends` (pinned by a test)."""
    backends = getattr(cache, "_backends", None)
    return list(backends.values()) if isinstance(backends, dict) else []


def is_in_process(cache: Any) -> bool:
    """Whether every backend of the cashews cache lives in this process's memory."""
    from cashews.backends.memory import Memory

    backends = _backends(cache)
    return bool(backends) and all(isinstance(b, Memory) for b in backends)


class CashewsBridge:
    """Deletes cashews tags after commits, here and (over pub/sub) in other processes."""

    def __init__(self, cache: Any, timeout: float) -> None:
        watch_cashews_errors()
        self.cache = cache
        self.timeout = timeout
        self.tags_deleted = 0
        self.errors = 0
        self.received = 0
        self._pending: set[str] = set()
        self._in_flight = 0  # tags of deletions under way (retries included)
        self._unpublished: set[str] = set()
        self._lock = threading.Lock()
        self._retry: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLog()  # one line per minute during an outage, not per commit
        #: the event loop the application's cashews cache was last used from
        self.loop: asyncio.AbstractEventLoop | None = None
        #: sends a message to the other processes (set by the manager on a shared backend)
        self.publish: Callable[[list[str]], None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending | self._unpublished) + self._in_flight

    @property
    def in_process(self) -> bool:
        return is_in_process(self.cache)

    def stats(self) -> dict[str, Any]:
        return {
            "tags_deleted": self.tags_deleted,
            "errors": self.errors,
            "pending": len(self._pending | self._unpublished) + self._in_flight,
            "received": self.received,
        }

    # -- after a commit -----------------------------------------------------------------------------

    def evict(self, tags: list[str]) -> None:
        """Delete `tags` here and tell the other processes; returns within the timeout."""
        if not tags:
            return
        self._tell_others(tags)
        with self._lock:
            batch = sorted(set(tags) | self._pending)
            self._pending.clear()
        if in_greenlet():
            loop = asyncio.get_running_loop()
            self.loop = loop
            task = loop.create_task(self._start(batch))
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await_(asyncio.wait_for(asyncio.shield(task), self.timeout))
            return
        self._evict_sync(batch)

    def _evict_sync(self, batch: list[str]) -> None:
        """A sync commit: run the deletion on the application's loop, or on a private one."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:  # a sync call inside a coroutine: never block its loop
            self._spawn(running, self._start(batch))
            return
        loop = self.loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._start(batch), loop)
            with contextlib.suppress(Exception):
                future.result(self.timeout)
            return
        try:
            asyncio.run(asyncio.wait_for(self._start(batch), self.timeout))
        except Exception:
            self._failed(batch, "timed out")

    def _tell_others(self, tags: list[str]) -> None:
        if self.publish is None:
            return
        with self._lock:
            batch = sorted(set(tags) | self._unpublished)
            self._unpublished.clear()
        try:
            self.publish(batch)
        except Exception as exc:
            with self._lock:
                self._unpublished.update(batch)
            self.errors += 1
            self._failed([], f"not published to other processes: {exc}")

    def _start(self, tags: list[str]) -> Coroutine[Any, Any, None]:
        """A deletion, counted as pending from now until it ends (`stats()["pending"]`)."""
        self._in_flight += len(tags)
        return self._delete(tags)

    async def _delete(self, tags: list[str]) -> None:
        swallowed: list[str] = []
        token = _SWALLOWED.set(swallowed)
        try:
            # cashews (suppress=True, its default) reports success even when it swallowed a
            # Redis error: PING (which it never swallows) before and after, and count the
            # errors it logs meanwhile
            await self.cache.ping(b"_tag:sqlacache")
            await self.cache.delete_tags(*tags)
            await self.cache.ping(b"_tag:sqlacache")
            if swallowed:
                raise ConnectionError(f"cashews swallowed: {swallowed[0]}")
        except Exception as exc:
            self._failed(tags, f"{type(exc).__name__}: {exc}")
            return
        finally:
            _SWALLOWED.reset(token)
            self._in_flight -= len(tags)
        self.tags_deleted += len(tags)

    def _failed(self, tags: list[str], reason: str) -> None:
        if tags:
            self.errors += 1
        with self._lock:
            self._pending.update(tags)
        self._log.warning("cashews", "sqlacache: cashews tags not deleted (%s); will retry", reason)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # retried with the next commit, or by flush_pending()
        if self._retry is None or self._retry.done():
            self._retry = loop.create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        delay = RETRY_FIRST
        while self._pending or self._unpublished:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            await self.redeliver()

    def keep(self, tags: list[str]) -> None:
        """Deliver later (a commit cancelled while its invalidation was in flight)."""
        with self._lock:
            self._pending.update(tags)
            if self.publish is not None:
                self._unpublished.update(tags)
        self._failed([], "the commit was cancelled")

    async def redeliver(self) -> None:
        """Send what is pending now (flush_pending, the retry task)."""
        if self._unpublished:
            # in SQLAlchemy's greenlet, so that the store uses its asyncio client
            await greenlet_spawn(self._tell_others, [])
        with self._lock:
            batch, self._pending = sorted(self._pending), set()
        if batch:
            errors = self.errors
            await self._start(batch)
            if self.errors != errors:
                return

    # -- deletions published by other processes (the subscriber thread) -------------------------

    def received_tags(self, tags: list[str]) -> None:
        """Tags another process's commit made stale; only an in-process cashews cache needs it."""
        if not self.in_process:
            return
        self.received += len(tags)
        self._run_here(lambda: self._start(tags))

    def lost_messages(self) -> None:
        """The subscription was lost and renewed: deletions may have been missed, so an
        in-process cashews cache is cleared (it is only a cache)."""
        if not self.in_process:
            return
        logger.warning("sqlacache: pub/sub was interrupted; clearing the in-process cashews cache")
        self._run_here(self._clear)

    async def _clear(self) -> None:
        try:
            await self.cache.clear()
        except Exception as exc:
            logger.warning("sqlacache: could not clear the cashews cache: %s", exc)

    def _run_here(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """From the subscriber thread: handed to the application's loop if it runs (never
        waited for: the thread must keep its heartbeat), else run right here (in-process
        cashews backends answer at once)."""
        loop = self.loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(make(), loop)
            return
        with contextlib.suppress(Exception):
            asyncio.run(make())

    def _spawn(self, loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
