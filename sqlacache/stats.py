"""Observability: counters per model and op, user hooks, and the `sqlacache` logger.

Hooks are called synchronously on the request path; an exception raised by one is logged and
swallowed, never shown to the application. Also what the backend holds under a prefix, for
operators (`namespace_stats`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from sqlalchemy.orm import Mapper

if TYPE_CHECKING:
    from .binding import Bound
    from .config import CacheConfig
    from .resilience import Breaker

logger = logging.getLogger("sqlacache")

#: on_hit(model_class, op) / on_miss(model_class, op)
HitHook = Callable[[Any, str], None]
InvalidateHook = Callable[[str, Any], None]
MismatchHook = Callable[[Any, str, str], None]


H = TypeVar("H")


class Hook(Generic[H]):
    """A hook attribute of the cache, assignable as upstream's users do (`cache.on_hit = fn`),
    kept in the owner's `counters` (its `Stats`), which call it."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Hook[H]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> H | None: ...
    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.counters, self.name)

    def __set__(self, obj: Any, hook: H | None) -> None:
        setattr(obj.counters, self.name, hook)


def _model_class(model: Any) -> Any:
    """Hooks receive the mapped class (`User`), as upstream's did, not SQLAlchemy's Mapper."""
    return getattr(model, "class_", model) if isinstance(model, Mapper) else model


class RateLimitedLog:
    """Logs a message at most once per `interval` seconds per key, counting the rest."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = defaultdict(int)

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] += 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            message += f" ({suppressed} similar messages suppressed)"
        logger.warning(message, *args)


class Stats:
    """Counters for one cache manager."""

    def __init__(self) -> None:
        # [hits, misses, stores, errors] per (model name, op)
        self._ops: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._bypasses: dict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self._invalidations: dict[str, int] = defaultdict(int)
        # verification mode: [checked, mismatches, inconclusive] per (model name, op)
        self._verify: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.payload_errors = 0
        self.unserializable = 0
        self.transport_errors = 0
        self.undelivered_invalidations = 0
        self.redelivered_invalidations = 0
        self.epoch_moves = 0
        #: exceptions raised inside sqlacache's own code, by kind: the read fell back to the database
        self.internal_errors: dict[str, int] = defaultdict(int)
        self.on_hit: HitHook | None = None
        self.on_miss: HitHook | None = None
        self.on_invalidate: InvalidateHook | None = None
        self.on_mismatch: MismatchHook | None = None
        self.log = RateLimitedLog()

    def hit(self, model: Any, name: str, op: str) -> None:
        self._ops[(name, op)][0] += 1
        if self.on_hit is not None:
            self._call(self.on_hit, _model_class(model), op)

    def miss(self, model: Any, name: str, op: str) -> None:
        self._ops[(name, op)][1] += 1
        if self.on_miss is not None:
            self._call(self.on_miss, _model_class(model), op)

    def stored(self, name: str, op: str) -> None:
        self._ops[(name, op)][2] += 1

    def error(self, name: str, op: str) -> None:
        self._ops[(name, op)][3] += 1

    def bypass(self, name: str, op: str, reason: str) -> None:
        self._bypasses[(name, op)][reason] += 1

    def skip(self, skip: Any) -> None:
        """A read that does not use the cache (a `decision.Skip`), under its model and op."""
        if skip.model is not None:
            self._bypasses[(skip.model, skip.op)][skip.reason] += 1

    def internal_error(self, kind: str, exc: BaseException) -> None:
        """An unforeseen exception in sqlacache's own code; the read fell back to the database."""
        first = kind not in self.internal_errors
        self.internal_errors[kind] += 1
        if first:
            logger.error(
                "sqlacache: internal error %s (%s); the database served this read, and will "
                "serve every read this error affects",
                kind,
                exc,
                exc_info=exc,
            )

    def verified(self, name: str, op: str) -> None:
        """A sampled hit that equalled the database's result."""
        self._verify[(name, op)][0] += 1

    def mismatched(self, model: Any, name: str, op: str, key: str) -> None:
        """A sampled hit that differed from the database's result."""
        counters = self._verify[(name, op)]
        counters[0] += 1
        counters[1] += 1
        if self.on_mismatch is not None:
            self._call(self.on_mismatch, _model_class(model), op, key)

    def verify_inconclusive(self, name: str, op: str) -> None:
        """A sampled hit that could not be compared (a concurrent write, an unreadable result)."""
        self._verify[(name, op)][2] += 1

    def invalidated(self, table: str, pks: Any) -> None:
        self._invalidations[table] += 1
        if self.on_invalidate is not None:
            self._call(self.on_invalidate, table, pks)

    def _call(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("sqlacache hook %r raised; ignored", hook)

    def as_dict(self) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        keys = set(self._ops) | set(self._bypasses) | set(self._verify)
        for name, op in sorted(keys):
            hits, misses, stores, errors = self._ops.get((name, op), [0, 0, 0, 0])
            checked, mismatches, inconclusive = self._verify.get((name, op), [0, 0, 0])
            models.setdefault(name, {})[op] = {
                "hits": hits,
                "misses": misses,
                "stores": stores,
                "errors": errors,
                "bypasses": dict(self._bypasses.get((name, op), {})),
                "verify_checked": checked,
                "verify_mismatches": mismatches,
                "verify_inconclusive": inconclusive,
            }
        totals = {"hits": 0, "misses": 0, "stores": 0, "errors": 0, "bypasses": 0}
        for ops in models.values():
            for counters in ops.values():
                for field in ("hits", "misses", "stores", "errors"):
                    totals[field] += counters[field]
                totals["bypasses"] += sum(counters["bypasses"].values())
        return {
            "models": models,
            "totals": totals,
            "invalidations": dict(self._invalidations),
            "verify": {
                "checked": sum(c[0] for c in self._verify.values()),
                "mismatches": sum(c[1] for c in self._verify.values()),
            },
            "payload_errors": self.payload_errors,
            "unserializable": self.unserializable,
            "transport_errors": self.transport_errors,
            "undelivered_invalidations": self.undelivered_invalidations,
            "redelivered_invalidations": self.redelivered_invalidations,
            "epoch_moves": self.epoch_moves,
            "internal_errors": dict(self.internal_errors),
        }

    def report(self, config: CacheConfig, breaker: Breaker, bound: Bound | None) -> dict[str, Any]:
        """What `cache.stats()` returns: the counters, the backend, the breaker, the queue, and
        the in-process tier's and the cashews bridge's counters where configured."""
        data: dict[str, Any] = {}
        if bound is not None and bound.local_tier is not None:
            data["local"] = bound.local_tier.stats()
        if bound is not None and bound.bridge is not None:
            data["cashews"] = bound.bridge.stats()
        data.update(self.as_dict())
        backend = config.backend
        data["backend"] = {
            "scheme": backend.scheme,
            "shared_between_processes": not backend.is_memory,
            "note": (
                "mem:// is per process: a write in one worker does not evict another worker's entries"
                if backend.is_memory
                else "shared by every process using this Redis and prefix"
            ),
            # what the backend's refusal says is wrong in the configuration (None if nothing)
            "config_error": breaker.config_error,
        }
        data["prefix"] = config.prefix
        data["circuit_breaker"] = {
            "state": breaker.state,
            "consecutive_failures": breaker.failures,
            "last_error": breaker.last_error,
        }
        data["pending_invalidations"] = bound.invalidator.pending if bound is not None else 0
        data["databases"] = bound.runtime.databases.identities() if bound is not None else []
        return data


def namespace_stats(store: Any, namespace: Any, prefix: str, backend_url: str) -> dict[str, Any]:
    """What the backend holds under this prefix (scans the keyspace; for operators).

    `store` raises `CacheUnavailable` when the backend cannot answer.
    """
    counts = {
        kind: sum(store.count_keys(key_prefix) for key_prefix in prefixes)
        for kind, prefixes in namespace.kinds().items()
    }
    return {
        "prefix": prefix,
        "backend": backend_url,
        **counts,
        "databases": store.members(namespace.databases_key),
        "note": "per-process hit/miss counters live in each process: see cache.stats()",
    }
