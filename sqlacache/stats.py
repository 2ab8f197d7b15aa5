"""Observability: counters per model and op, user hooks, and the `sqlacache` logger.

Hooks are called synchronously on the request path; an exception raised by one is logged and
swallowed, never shown to the application (SPEC §6).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sqlacache")

HitHook = Callable[[Any, str], None]
InvalidateHook = Callable[[str, Any], None]
MismatchHook = Callable[[Any, str, str], None]


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
        self.on_hit: HitHook | None = None
        self.on_miss: HitHook | None = None
        self.on_invalidate: InvalidateHook | None = None
        self.on_mismatch: MismatchHook | None = None
        self.log = RateLimitedLog()

    def hit(self, model: Any, name: str, op: str) -> None:
        self._ops[(name, op)][0] += 1
        if self.on_hit is not None:
            self._call(self.on_hit, model, op)

    def miss(self, model: Any, name: str, op: str) -> None:
        self._ops[(name, op)][1] += 1
        if self.on_miss is not None:
            self._call(self.on_miss, model, op)

    def stored(self, name: str, op: str) -> None:
        self._ops[(name, op)][2] += 1

    def error(self, name: str, op: str) -> None:
        self._ops[(name, op)][3] += 1

    def bypass(self, name: str, op: str, reason: str) -> None:
        self._bypasses[(name, op)][reason] += 1

    def verified(self, name: str, op: str) -> None:
        """A sampled hit that equalled the database's result."""
        self._verify[(name, op)][0] += 1

    def mismatched(self, model: Any, name: str, op: str, key: str) -> None:
        """A sampled hit that differed from the database's result."""
        counters = self._verify[(name, op)]
        counters[0] += 1
        counters[1] += 1
        if self.on_mismatch is not None:
            self._call(self.on_mismatch, model, op, key)

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
        }
