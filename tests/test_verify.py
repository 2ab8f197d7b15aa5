"""Verification mode: sampled hits are also run on the database and compared with the cache.

A mismatch is counted, reported to `on_mismatch`, logged once and evicted; the application is
always served the database's result. Runs on mem:// + SQLite here and on Redis + PostgreSQL from
integration/.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import event, exists, func, select, text
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.util import await_only

import sqlacache
from sqlacache import ConfigError
from sqlacache.verify import same
from tests.fixtures import create_engine_for
from tests.models import Order, Role, User

VERIFY_OFF = {"checked": 0, "mismatches": 0}


async def seed(sessions):
    async with sessions() as s:
        admin, dev = Role(id=1, name="admin"), Role(id=2, name="dev")
        s.add_all(
            [
                User(id=1, name="ann", roles=[admin], orders=[Order(id=1, total=10)]),
                User(id=2, name="bob", roles=[admin, dev], orders=[Order(id=2, total=20)]),
                User(id=3, name="cy"),
                admin,
                dev,
            ]
        )
        await s.commit()


async def name_of(sessions, pk):
    async with sessions() as s:
        user = await s.get(User, pk)
        return None if user is None else user.name


async def behind_the_cache(stack, statement):
    """Raw SQL on an engine the cache is not bound to: a write the cache cannot see."""
    other = await create_engine_for(stack)
    try:
        async with other.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await other.dispose()


def user_get(cache):
    return cache.stats()["models"]["tests.models.User"]["get"]


async def filled(cache, read):
    """Run `read` once (a miss that fills) and wait until the entry has landed."""
    value = await read()
    await cache.flush_pending()
    return value


async def test_a_row_changed_behind_the_caches_back_is_served_fresh_reported_and_evicted(
    stack, make_cache, sessions, sql
):
    reported = []
    cache = await make_cache(
        verify=1.0,
        on_mismatch=lambda model, op, key: reported.append((model.__name__, op, key)),
    )
    await seed(sessions)
    assert await filled(cache, lambda: name_of(sessions, 1)) == "ann"
    await behind_the_cache(stack, "UPDATE users SET name = 'changed' WHERE id = 1")

    sql.reset()
    assert await name_of(sessions, 1) == "changed"  # the database's result, not the entry
    assert sql.selects == 1
    assert cache.stats()["verify"] == {"checked": 1, "mismatches": 1}
    counters = user_get(cache)
    assert (counters["verify_checked"], counters["verify_mismatches"]) == (1, 1)
    assert len(reported) == 1
    model, op, key = reported[0]
    assert (model, op) == ("User", "get") and key.startswith(f"{cache.config.prefix}:e:")

    # evicted: the next read misses and fills, the one after is a (checked, matching) hit
    misses, hits = counters["misses"], counters["hits"]
    assert await filled(cache, lambda: name_of(sessions, 1)) == "changed"
    assert user_get(cache)["misses"] == misses + 1
    assert await name_of(sessions, 1) == "changed"
    assert user_get(cache)["hits"] == hits + 1
    assert cache.stats()["verify"] == {"checked": 2, "mismatches": 1}
    assert len(reported) == 1


async def test_with_verify_off_a_hit_runs_no_sql_and_checks_nothing(
    stack, make_cache, sessions, sql
):
    cache = await make_cache()
    await seed(sessions)
    await filled(cache, lambda: name_of(sessions, 1))
    await behind_the_cache(stack, "UPDATE users SET name = 'changed' WHERE id = 1")
    sql.reset()
    # raw SQL the cache cannot see leaves the entry stale: what verification mode is there to find
    assert await name_of(sessions, 1) == "ann"
    assert sql.statements == []
    assert cache.stats()["verify"] == VERIFY_OFF
    assert user_get(cache)["verify_checked"] == 0


@pytest.mark.parametrize("value", [-0.1, 1.5, 2, "0.1", None, True, float("nan"), [0.5]])
def test_a_bad_verify_fraction_raises_config_error_naming_verify(value):
    with pytest.raises(ConfigError, match="verify"):
        sqlacache.configure(verify=value)
    with pytest.raises(ConfigError, match=r"models\['\*'\]\['verify'\]"):
        sqlacache.configure(models={"*": {"verify": value}})


@pytest.mark.parametrize("value", [0, 0.0, 0.01, 1, 1.0])
def test_a_verify_fraction_from_zero_to_one_is_accepted(value):
    sqlacache.configure(verify=value, models={"*": {"verify": value}})


def _plain(rows: Any) -> Any:
    """Results as data: column values, loaded collections, never a lazy load."""

    def obj(o: Any) -> Any:
        if isinstance(o, User):
            return (
                "User",
                o.id,
                o.name,
                o.__dict__.get("orders") and [x.id for x in o.orders],
                o.__dict__.get("roles") and [r.id for r in o.roles],
            )
        if isinstance(o, Order):
            return ("Order", o.id, o.total, o.__dict__.get("user") and o.user.id)
        return o

    return [tuple(obj(cell) for cell in row) for row in rows]


STATEMENTS = {
    "get": lambda: select(User).where(User.id == 2),
    "fetch": lambda: select(User).order_by(User.id),
    "fetch_unordered": lambda: select(User).where(User.id > 1),
    "selectin": lambda: (
        select(User).options(selectinload(User.orders), selectinload(User.roles)).order_by(User.id)
    ),
    "joined_collection": lambda: select(User).options(joinedload(User.roles)).order_by(User.id),
    "joined_many_to_one": lambda: select(Order).options(joinedload(Order.user)).order_by(Order.id),
    "columns": lambda: select(User.id, User.name, User.score).order_by(User.name),
    "count": lambda: select(func.count()).select_from(User),
    "exists": lambda: select(exists().where(Order.total > 15)),
}


@pytest.mark.parametrize("name", list(STATEMENTS))
async def test_a_verified_hit_that_matches_changes_nothing_the_application_sees(
    make_cache, sessions, sql, name
):
    cache = await make_cache(verify=1.0)
    await seed(sessions)
    stmt = STATEMENTS[name]

    async def read(**options: Any) -> Any:
        async with sessions() as s:
            result = await s.execute(stmt(), execution_options=options)
            if name == "joined_collection":
                result = result.unique()
            return _plain(result.all())

    uncached = await read(cache=False)
    assert await filled(cache, read) == uncached
    sql.reset()
    assert await read() == uncached
    assert sql.selects >= 1  # the statement ran: the database's result was served
    assert cache.stats()["verify"] == {"checked": 1, "mismatches": 0}


async def test_objects_served_by_a_verified_hit_work_like_uncached_ones(make_cache, sessions):
    cache = await make_cache(verify=1.0)
    await seed(sessions)
    stmt = select(User).where(User.id == 2)
    await filled(cache, lambda: name_of(sessions, 2))
    async with sessions() as s:
        await s.execute(stmt)
    await cache.flush_pending()
    async with sessions() as s:
        user = (await s.execute(stmt)).scalar_one()
        assert [o.total for o in await user.awaitable_attrs.orders] == [20]  # a lazy load
        user.name = "bobby"
        await s.commit()
    assert await name_of(sessions, 2) == "bobby"
    assert cache.stats()["verify"]["mismatches"] == 0


async def test_a_verified_hit_hands_back_the_objects_the_session_already_holds(
    stack, make_cache, sessions
):
    cache = await make_cache(verify=1.0)
    await seed(sessions)
    stmt = select(User).order_by(User.id)
    async with sessions() as s:
        held = await s.get(User, 1, execution_options={"cache": False})
        await behind_the_cache(stack, "UPDATE users SET name = 'changed' WHERE id = 1")
        assert await filled(cache, lambda: _read_all(sessions, stmt)) == ["changed", "bob", "cy"]
        users = (await s.execute(stmt)).scalars().all()
        # as uncached: the session's own object, with the values it had loaded
        assert users[0] is held and held.name == "ann"
    # the entry is fresh; the session's older copy is the session's own, not the cache's fault
    assert cache.stats()["verify"] == {"checked": 1, "mismatches": 0}


async def test_an_expired_object_is_compared_on_what_the_read_loads_into_it(
    stack, make_cache, sessions
):
    cache = await make_cache(verify=1.0)
    await seed(sessions)
    stmt = select(User).order_by(User.id)
    await filled(cache, lambda: _read_all(sessions, stmt))
    async with sessions() as s:
        held = await s.get(User, 1, execution_options={"cache": False})
        s.expire(held)  # a hit would fill its attributes from the entry
        await behind_the_cache(stack, "UPDATE users SET name = 'changed' WHERE id = 1")
        users = (await s.execute(stmt)).scalars().all()
        assert users[0] is held and held.name == "changed"
    assert cache.stats()["verify"] == {"checked": 1, "mismatches": 1}


async def _read_all(sessions, stmt):
    async with sessions() as s:
        return [u.name for u in (await s.execute(stmt)).scalars()]


async def test_a_row_entering_a_cached_result_behind_the_caches_back_is_a_mismatch(
    stack, make_cache, sessions
):
    cache = await make_cache(verify=1.0)
    await seed(sessions)
    stmt = select(User).order_by(User.id)
    await filled(cache, lambda: _read_all(sessions, stmt))
    await behind_the_cache(
        stack, "INSERT INTO users (id, name, active, status) VALUES (9, 'new', true, 'ACTIVE')"
    )
    assert await _read_all(sessions, stmt) == ["ann", "bob", "cy", "new"]
    counters = cache.stats()["models"]["tests.models.User"]["fetch"]
    assert (counters["verify_checked"], counters["verify_mismatches"]) == (1, 1)


async def test_a_model_can_turn_verification_on_for_itself(make_cache, sessions, sql):
    cache = await make_cache({"tests.models.User": {"verify": 1.0}, "*": {}})
    await seed(sessions)
    async with sessions() as s:
        await s.get(User, 1)
        await s.get(Role, 1)
    await cache.flush_pending()
    sql.reset()
    async with sessions() as s:
        await s.get(Role, 1)
    assert sql.statements == []  # Role inherits verify=0 from the configuration
    async with sessions() as s:
        await s.get(User, 1)
    assert sql.selects == 1
    models = cache.stats()["models"]
    assert models["tests.models.User"]["get"]["verify_checked"] == 1
    assert models["tests.models.Role"]["get"]["verify_checked"] == 0


async def test_a_model_can_turn_verification_off_for_itself(make_cache, sessions, sql):
    cache = await make_cache({"tests.models.Role": {"verify": 0}, "*": {}}, verify=1.0)
    await seed(sessions)
    async with sessions() as s:
        await s.get(Role, 1)
    await cache.flush_pending()
    sql.reset()
    async with sessions() as s:
        await s.get(Role, 1)
    assert sql.statements == []
    assert cache.stats()["verify"] == VERIFY_OFF


async def test_a_fraction_checks_about_that_share_of_hits(make_cache, sessions):
    cache = await make_cache(verify=0.5)
    await seed(sessions)
    await filled(cache, lambda: name_of(sessions, 1))
    for _ in range(40):  # 5 < checked < 35 fails with a probability of about 1e-6
        await name_of(sessions, 1)
    checked = cache.stats()["verify"]["checked"]
    assert 5 < checked < 35
    assert user_get(cache)["hits"] == 40


async def test_a_mismatch_is_one_rate_limited_warning_naming_model_op_tables_and_key(
    stack, make_cache, sessions, caplog
):
    keys = []
    cache = await make_cache(verify=1.0, on_mismatch=lambda model, op, key: keys.append(key))
    await seed(sessions)
    with caplog.at_level(logging.WARNING, logger="sqlacache"):
        for name in ("first", "second"):
            await filled(cache, lambda: name_of(sessions, 1))
            await behind_the_cache(stack, f"UPDATE users SET name = '{name}' WHERE id = 1")
            assert await name_of(sessions, 1) == name
    assert cache.stats()["verify"]["mismatches"] == 2 and len(keys) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "tests.models.User" in warnings[0] and " get " in warnings[0]
    assert "tables read: users" in warnings[0] and keys[0] in warnings[0]
    assert "User.name" in warnings[0]  # what differed, never the values
    assert "ann" not in warnings[0] and "first" not in warnings[0]


class PauseBeforeSelect:
    """Holds the next SELECT on a table before it is sent, until released."""

    def __init__(self, engine: Any, table: str) -> None:
        self.table = table
        self.armed = False
        self.paused = asyncio.Event()
        self.released = asyncio.Event()
        event.listen(engine.sync_engine, "before_cursor_execute", self._before)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        is_select = statement.lstrip().upper().startswith("SELECT")
        if self.armed and is_select and self.table in statement:
            self.armed = False
            self.paused.set()
            await_only(self.released.wait())  # we are in SQLAlchemy's greenlet


async def test_a_write_committed_during_the_check_is_not_reported_as_a_mismatch(
    make_cache, sessions, engine
):
    reported = []
    cache = await make_cache(verify=1.0, on_mismatch=lambda *args: reported.append(args))
    await seed(sessions)
    await filled(cache, lambda: name_of(sessions, 1))
    pause = PauseBeforeSelect(engine, "users")
    pause.armed = True
    reader = asyncio.create_task(name_of(sessions, 1))
    await pause.paused.wait()  # the hit is validated; its database query is not sent yet
    async with sessions() as s:
        (await s.get(User, 1, execution_options={"cache": False})).name = "renamed"
        await s.commit()
    pause.released.set()
    assert await reader == "renamed"
    assert reported == []
    assert cache.stats()["verify"] == VERIFY_OFF
    assert user_get(cache)["verify_inconclusive"] == 1
    assert await name_of(sessions, 1) == "renamed"


async def test_the_exporters_publish_the_verification_counters(stack, make_cache, sessions):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    from sqlacache.metrics import PrometheusCollector, register_opentelemetry

    cache = await make_cache(verify=1.0)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(cache))
    reader = InMemoryMetricReader()
    register_opentelemetry(cache, MeterProvider(metric_readers=[reader]))
    await seed(sessions)
    await filled(cache, lambda: name_of(sessions, 1))
    await behind_the_cache(stack, "UPDATE users SET name = 'changed' WHERE id = 1")
    await name_of(sessions, 1)

    prefix = cache.config.prefix
    labels = f'{{model="tests.models.User",op="get",prefix="{prefix}"}}'
    text_out = generate_latest(registry).decode()
    assert f"sqlacache_verify_checked_total{labels} 1.0" in text_out
    assert f"sqlacache_verify_mismatches_total{labels} 1.0" in text_out
    points = {
        (metric.name, tuple(sorted(point.attributes.items()))): point.value
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for point in metric.data.data_points
    }
    attributes = (("model", "tests.models.User"), ("op", "get"), ("prefix", prefix))
    assert points[("sqlacache.verify.mismatches", attributes)] == 1
    assert points[("sqlacache.verify.checked", attributes)] == 1


class DriverUUID(uuid.UUID):
    """Stands for a driver's subclass of a documented type (asyncpg returns one for UUID)."""


def test_values_compare_as_a_hit_must_reproduce_them():
    utc = datetime.timezone.utc
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    moment = datetime.datetime(2026, 1, 1, 12, tzinfo=utc)
    token = uuid.uuid4()
    assert same(DriverUUID(str(token)), token)
    assert not same(True, 1) and not same(1, 1.0) and not same("1", 1)
    assert same(float("nan"), float("nan"))
    assert not same(decimal.Decimal("1.50"), decimal.Decimal("1.5"))
    assert same(decimal.Decimal("1.50"), decimal.Decimal("1.50"))
    assert not same(moment, moment.astimezone(plus_one))  # same instant, another tzinfo
    assert not same(moment, moment.replace(tzinfo=None))
    assert same({"k": [1, {"x": None}]}, {"k": [1, {"x": None}]})
    assert not same({"k": [1]}, {"k": [True]})


def test_sqlalchemy_keeps_order_by_where_verification_reads_it():
    assert select(User).order_by(User.id)._order_by_clauses
    assert not select(User)._order_by_clauses


def test_sync_sessions_are_verified_too(stack):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from tests.models import Base
    from tests.test_sync import sync_url

    engine = create_engine(sync_url(stack))
    other = create_engine(sync_url(stack))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cache = sqlacache.configure(
        stack.backend, models={"*": {}}, prefix=f"vsync{uuid.uuid4().hex[:8]}", verify=1.0
    )
    cache.bind_sync(engine)
    try:
        with Session(engine) as s:
            s.add(User(id=1, name="ann"))
            s.commit()
        for _ in range(2):  # a miss that fills, then a matching checked hit
            with Session(engine) as s:
                assert s.get(User, 1).name == "ann"
        with other.begin() as conn:
            conn.execute(text("UPDATE users SET name = 'changed' WHERE id = 1"))
        with Session(engine) as s:
            assert s.get(User, 1).name == "changed"
        assert cache.stats()["verify"] == {"checked": 2, "mismatches": 1}
    finally:
        cache.invalidate_all_sync()
        cache.disconnect_sync()
        other.dispose()
        engine.dispose()


async def test_the_global_fraction_also_checks_hits_forced_by_cache_execute(make_cache, sessions):
    cache = await make_cache({"tests.models.User": None}, verify=1.0)
    await seed(sessions)
    stmt = select(User).where(User.id == 1)
    for _ in range(2):  # a forced miss that fills, then a forced, checked hit
        async with sessions() as s:
            assert (await cache.execute(s, stmt)).scalar_one().name == "ann"
        await cache.flush_pending()
    assert cache.stats()["verify"] == {"checked": 1, "mismatches": 0}
