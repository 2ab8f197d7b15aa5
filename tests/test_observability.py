"""Observability: stats, hooks that never break requests, logs, metric exporters."""

from __future__ import annotations

import logging

from sqlalchemy import select

from tests.models import User


async def seed(sessions):
    async with sessions() as s:
        s.add_all([User(id=1, name="a"), User(id=2, name="b")])
        await s.commit()


async def read(sessions):
    async with sessions() as s:
        await s.get(User, 1)
        await s.execute(select(User).where(User.id == 2).with_for_update())


async def test_stats_count_hits_misses_stores_bypasses_and_invalidations(cache, sessions):
    await seed(sessions)
    await read(sessions)
    await read(sessions)
    stats = cache.stats()
    user = stats["models"]["tests.models.User"]
    assert user["get"]["hits"] == 1 and user["get"]["misses"] == 1 and user["get"]["stores"] == 1
    assert user["get"]["bypasses"] == {"for_update": 2}  # WHERE is on the pk: a get
    assert stats["invalidations"]["users"] >= 1
    assert stats["circuit_breaker"]["state"] == "closed"
    assert stats["backend"]["shared_between_processes"] is (cache.config.backend.scheme != "mem")


async def test_hooks_see_hits_misses_and_invalidations_and_their_errors_are_swallowed(
    make_cache, sessions, caplog
):
    seen = []

    def on_hit(model, op):
        seen.append(("hit", model.__name__, op))
        raise RuntimeError("a broken metrics hook")

    cache = await make_cache(
        on_miss=lambda model, op: seen.append(("miss", model.__name__, op)),
        on_invalidate=lambda table, pks: seen.append(("invalidate", table, pks)),
    )
    cache.on_hit = on_hit  # assignable, as upstream's users do
    await seed(sessions)
    with caplog.at_level(logging.ERROR, logger="sqlacache"):
        for _ in range(2):
            async with sessions() as s:
                assert (await s.get(User, 1)).name == "a"
    async with sessions() as s:
        (await s.get(User, 1)).name = "c"
        await s.commit()
    assert ("miss", "User", "get") in seen and ("hit", "User", "get") in seen
    assert ("invalidate", "users", ["1"]) in seen
    assert "a broken metrics hook" in caplog.text


async def test_debug_logs_each_hit_and_miss_and_nothing_at_info(cache, sessions, caplog):
    await seed(sessions)
    with caplog.at_level(logging.DEBUG, logger="sqlacache"):
        await read(sessions)
        await read(sessions)
    messages = [r.getMessage() for r in caplog.records if r.name == "sqlacache"]
    assert any("miss" in m and "key=" in m for m in messages)
    assert any("hit" in m and "key=" in m for m in messages)
    assert not [r for r in caplog.records if r.name == "sqlacache" and r.levelno >= logging.INFO]


async def test_prometheus_collector_exports_the_counters(cache, sessions):
    from prometheus_client import CollectorRegistry, generate_latest

    from sqlacache.metrics import PrometheusCollector

    await seed(sessions)
    await read(sessions)
    await read(sessions)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(cache))
    text = generate_latest(registry).decode()
    prefix = cache.config.prefix
    assert (
        f'sqlacache_hits_total{{model="tests.models.User",op="get",prefix="{prefix}"}} 1.0' in text
    )
    assert f'sqlacache_circuit_breaker_open{{prefix="{prefix}"}} 0.0' in text
    assert 'reason="for_update"' in text


async def test_opentelemetry_observable_instruments(cache, sessions):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from sqlacache.metrics import register_opentelemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register_opentelemetry(cache, provider)
    await seed(sessions)
    await read(sessions)
    await read(sessions)
    data = reader.get_metrics_data()
    points = {
        (metric.name, tuple(sorted(point.attributes.items()))): point.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for point in metric.data.data_points
    }
    key = (
        "sqlacache.hits",
        (("model", "tests.models.User"), ("op", "get"), ("prefix", cache.config.prefix)),
    )
    assert points[key] == 1
