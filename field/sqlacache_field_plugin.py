"""pytest plugin for the field test: binds sqlacache to every SQLAlchemy engine a suite creates.

Loaded into a real project's own test suite with `-p sqlacache_field_plugin` (this directory on
`PYTHONPATH`). Driven by environment variables, so the project's files stay untouched:

- `SQLACACHE_FIELD_BACKEND`: a backend URL (`mem://`, `redis://...`). Unset: a baseline run, the
  cache is not configured and the plugin only records outcomes.
- `SQLACACHE_FIELD_PREFIX`: the key prefix (one per run, so runs sharing a Redis never meet).
- `SQLACACHE_FIELD_CONFIG`: a JSON object of extra `configure()` keyword arguments (for example
  `{"verify": 1.0}`). They are passed as given: an argument `configure()` does not know is an
  error of the run, never silently dropped.
- `SQLACACHE_FIELD_REPORT`: where the JSON report is written at the end of the session: outcome
  counts, the failing test ids, `stats()` of the cache, hits per failing test, and the distinct
  messages the `sqlacache` logger emitted at WARNING or above.

One cache is configured per test session and caches every mapped model (`models={"*": {}}`).
Every engine is bound at its first connection (an `engine_connect` listener on the `Engine`
class), which is before it runs any statement; an `AsyncEngine` is bound through its sync engine.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
import weakref
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

_cache: Any = None
_bound = 0
_pools: weakref.WeakSet[Any] = weakref.WeakSet()  # pools already bound (the cache keys on them)
_bind_errors: Counter[str] = Counter()
_messages: Counter[str] = Counter()
_hits_by_test: dict[str, dict[str, int]] = {}
_started = time.monotonic()


class _Collect(logging.Handler):
    """Counts the distinct WARNING+ messages of the `sqlacache` logger (with the exception type)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" [{type(exc).__name__}: {exc}]"
        _messages[f"{record.levelname}: {text[:400]}"] += 1


def _bind(connection: Connection) -> None:
    """Bind the connection's engine (a no-op for an engine already bound: one dict lookup)."""
    global _bound
    if _cache is None:
        return
    engine = connection.engine
    if engine.pool in _pools:
        return
    _pools.add(engine.pool)
    try:
        _cache.bind_sync(engine)
        _bound += 1
    except Exception as exc:  # a bind failure is a finding: recorded, and the suite goes on
        _bind_errors[f"{type(exc).__name__}: {exc}"[:400]] += 1


def _totals() -> dict[str, int]:
    return dict(_cache.stats()["totals"]) if _cache is not None else {}


def pytest_configure(config: pytest.Config) -> None:
    global _cache
    backend = os.environ.get("SQLACACHE_FIELD_BACKEND")
    if not backend:
        return
    import sqlacache

    extra = json.loads(os.environ.get("SQLACACHE_FIELD_CONFIG") or "{}")
    if not isinstance(extra, dict):
        raise pytest.UsageError("SQLACACHE_FIELD_CONFIG must be a JSON object")
    prefix = os.environ.get("SQLACACHE_FIELD_PREFIX") or f"field{os.getpid()}"
    _cache = sqlacache.configure(backend=backend, models={"*": {}}, prefix=prefix, **extra)
    handler = _Collect(level=logging.WARNING)
    logging.getLogger("sqlacache").addHandler(handler)
    event.listen(Engine, "engine_connect", _bind)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    before = _totals()
    yield
    after = _totals()
    if after:
        _hits_by_test[item.nodeid] = {k: after[k] - before.get(k, 0) for k in after}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("SQLACACHE_FIELD_REPORT")
    if not path:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats: dict[str, list[Any]] = getattr(reporter, "stats", {}) if reporter else {}
    # pytest files setup and teardown errors under "error" too, as its summary line counts them
    outcomes = {
        key: len(stats.get(key, []))
        for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    }
    failing = sorted(
        {getattr(r, "nodeid", "?") for key in ("failed", "error") for r in stats.get(key, [])}
    )
    report: dict[str, Any] = {
        "outcomes": outcomes,
        "failing": failing,
        "exitstatus": int(exitstatus),
        "seconds": round(time.monotonic() - _started, 1),
        "cached": _cache is not None,
    }
    if _cache is not None:
        try:
            report["stats"] = _cache.stats()
        except Exception:
            report["stats_error"] = traceback.format_exc()
        report["engines_bound"] = _bound
        report["bind_errors"] = dict(_bind_errors)
        report["log_messages"] = dict(_messages.most_common(50))
        report["failing_tests_cache"] = {
            nodeid: _hits_by_test.get(nodeid, {}) for nodeid in failing
        }
        if not _cache.config.backend.is_memory:
            # a run's keys are removed from the shared Redis (only this run's prefix)
            try:
                _cache.invalidate_all_sync()
            except Exception as exc:
                report["cleanup_error"] = repr(exc)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=True, default=str)
