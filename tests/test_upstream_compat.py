"""Users of upstream sqlacache 0.1.x switch by changing the install line: one test per section of
upstream's README and per documented configuration form, each proving a hit by counting SQL.

integration/test_upstream_compat.py runs the same tests on Redis + PostgreSQL.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest
from sqlalchemy import exists, func, select, update

import sqlacache
from sqlacache import ConfigError
from tests.catalog import Product
from tests.fixtures import SQLCounter, Stack
from tests.models import Seat, User

# -- helpers ------------------------------------------------------------------------------------


async def seed(sessions: Any) -> None:
    async with sessions() as s:
        s.add_all([User(id=i, name=f"user {i}", active=i % 2 == 1) for i in (1, 2, 3, 42, 99)])
        s.add_all([Product(id=1, title="p", price=3)])
        await s.commit()


async def selects_of(sql: SQLCounter, action: Any) -> int:
    before = sql.selects
    await action()
    return sql.selects - before


async def get_user(sessions: Any, pk: int = 42) -> str | None:
    async with sessions() as s:
        user = await s.get(User, pk)
        return None if user is None else user.name


async def assert_get_is_cached(sessions: Any, sql: SQLCounter, pk: int = 42) -> None:
    await get_user(sessions, pk)  # miss (or already cached)
    assert await selects_of(sql, lambda: get_user(sessions, pk)) == 0, "the repeat get ran SQL"


async def rename(sessions: Any, pk: int, name: str) -> None:
    async with sessions() as s:
        user = await s.get(User, pk)
        assert user is not None
        user.name = name
        await s.commit()


# -- Installation: pip install sqlacache (mem://) / sqlacache[redis] ----------------------------


async def test_installation_mem_backend_needs_no_redis_client(
    make_cache, sessions, sql, monkeypatch
):
    # None in sys.modules makes `import redis` raise ImportError, as if it were not installed
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    cache = sqlacache.configure("mem://", models={"*": {}})
    assert cache.config.backend.is_memory
    await make_cache(backend="mem://")
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)


def test_installation_redis_backend_without_redis_client_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r'pip install "sqlacache\[redis\]"'):
        sqlacache.configure("redis://localhost:6379/1", models={"*": {}})


# -- Setup: configure() once, then bind(engine) -------------------------------------------------


async def test_setup_section_configuration_caches_reads(make_cache, sessions, sql):
    await make_cache(
        models={
            "tests.models.User": {"ops": {"get", "fetch"}, "timeout": 900},
            "tests.catalog.Product": {"ops": "all", "timeout": 3600},
            "*": {"timeout": 3600},
        }
    )
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)

    async def count_products() -> None:
        async with sessions() as s:
            assert await s.scalar(select(func.count()).select_from(Product)) == 1

    await count_products()
    assert await selects_of(sql, count_products) == 0


# -- Usage: reads are cached automatically; writes invalidate automatically ---------------------


async def test_usage_reads_are_cached_automatically(cache, sessions, sql):
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)

    async def active_users() -> None:
        async with sessions() as s:
            result = await s.execute(select(User).where(User.active == True))  # noqa: E712
            assert sorted(u.id for u in result.scalars().all()) == [1, 3, 99]

    await active_users()
    assert await selects_of(sql, active_users) == 0


async def test_usage_writes_invalidate_automatically(cache, sessions, sql):
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)
    await rename(sessions, 42, "Alice")
    assert await get_user(sessions) == "Alice"
    await assert_get_is_cached(sessions, sql)


# -- Configuration reference: configure() arguments and model config ----------------------------


async def test_configuration_reference_arguments_are_accepted(make_cache, sessions, sql):
    cache = await make_cache(
        models={"tests.models.User": {"ops": {"get", "fetch"}, "timeout": 900}},
        default_timeout=3600,
        serializer="sqlalchemy",
    )
    assert cache.config["default_timeout"] == 3600
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)


@pytest.mark.parametrize("ops", ["all", {"get"}, {"fetch"}, {"count"}, {"exists"}])
async def test_model_config_ops_table(make_cache, sessions, sql, ops):
    await make_cache(models={"tests.models.User": {"ops": ops, "timeout": 60}})
    await seed(sessions)
    statements = {
        "get": None,
        "fetch": select(User).where(User.active).order_by(User.id),
        "count": select(func.count()).select_from(User),
        "exists": select(exists().where(User.name == "user 3")),
    }
    for op, stmt in statements.items():

        async def run(stmt: Any = stmt) -> None:
            async with sessions() as s:
                if stmt is None:
                    await s.get(User, 1)
                else:
                    (await s.execute(stmt)).all()

        await run()
        cached = ops == "all" or op in ops
        assert (await selects_of(sql, run) == 0) is cached, f"op {op} with ops={ops}"


@pytest.mark.parametrize(
    "key",
    ["tests.models.User", "tests.models.*", "*", User],
    ids=["dotted path", "module pattern", "wildcard", "class"],
)
async def test_every_documented_models_key_form_caches(make_cache, sessions, sql, key):
    await make_cache(models={key: {"timeout": 60}})
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)


async def test_model_entry_none_disables_and_empty_entry_inherits(make_cache, sessions, sql):
    cache = await make_cache(
        models={"tests.models.User": None, "tests.catalog.Product": {}, "*": {}}
    )
    await seed(sessions)
    await get_user(sessions)
    assert await selects_of(sql, lambda: get_user(sessions)) == 1, "None disables caching"
    assert cache.get_model_config(User) is None and not cache.is_enabled(User, "get")
    assert cache.get_model_config(Product) == {
        "ops": frozenset({"get", "fetch", "count", "exists"}),
        "timeout": cache.config["default_timeout"],
        "lock": False,
    }
    assert cache.is_enabled(Product, "count")


# -- Backends: URL, URL with options, upstream's mapping with options ---------------------------


def backend_forms(stack: Stack) -> dict[str, Any]:
    url = stack.backend
    if url.startswith("mem://"):
        return {
            "url": "mem://",
            "url with options": "mem://?size=1000&socket_timeout=2&password=ignored",
            "mapping": {"url": "mem://"},
            "mapping with connection options": {
                "url": "mem://",
                "password": "ignored on mem://",
                "socket_keepalive": True,
                "max_connections": 8,
            },
        }
    return {
        "url": url,
        "url with options": f"{url}?socket_keepalive=true&health_check_interval=30"
        "&client_name=sqlacache-test&max_connections=16&socket_timeout=0.5",
        "mapping": {"url": url},
        "mapping with connection options": {
            "url": url,
            "socket_keepalive": True,
            "max_connections": 8,
            "client_name": "sqlacache-test",
            "retry_on_timeout": True,  # accepted, has no effect (sqlacache never retries)
            "encoding": "utf-8",
        },
    }


@pytest.mark.parametrize(
    "form", ["url", "url with options", "mapping", "mapping with connection options"]
)
async def test_every_documented_backend_form_caches(make_cache, stack, sessions, sql, form):
    cache = await make_cache(backend=backend_forms(stack)[form])
    assert cache.config["backend"] == backend_forms(stack)[form]
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)
    await rename(sessions, 42, "changed")
    assert await get_user(sessions) == "changed"


def test_redis_option_types_follow_redis_py():
    pytest.importorskip("redis")
    backend = sqlacache.configure(
        "redis://user:pa%40ss@localhost:6379/3?socket_keepalive=false&health_check_interval=5"
        "&max_connections=9&socket_connect_timeout=0.3&client_name=app&protocol=2"
    ).config.backend
    assert backend.options == {
        "username": "user",
        "password": "pa@ss",
        "db": 3,
        "socket_keepalive": False,
        "health_check_interval": 5,
        "max_connections": 9,
        "socket_connect_timeout": 0.3,
        "client_name": "app",
        "protocol": 2,
    }
    assert "pa" not in backend.url and backend.display == "redis://localhost:6379/3"
    mapped = sqlacache.configure(
        {"url": "redis://localhost:6379", "db": "2", "password": "x", "ssl": True,
         "ssl_cert_reqs": "none", "socket_keepalive": "yes"}
    ).config.backend  # fmt: skip
    assert mapped.scheme == "rediss" and mapped.url == "rediss://localhost:6379"
    assert mapped.options["db"] == 2 and mapped.options["socket_keepalive"] is True
    assert mapped.options["ssl_cert_reqs"] == "none"


@pytest.mark.parametrize(
    ("backend", "culprit"),
    [
        ("redis://h/0?decode_responses=true", "raw bytes"),
        ({"url": "redis://h/0", "retry": object()}, "never retries"),
        ("redis://h/0?socket_timeout=0", "bounded"),
        ({"url": "redis://h/0", "socket_timeout": None}, "bounded"),
        ("redis://h/0?ssl_certfile=c.pem", "needs TLS"),
        ("rediss://h/0?ssl_validate_ocsp=true", "redis.asyncio"),
        ({"url": "redis://:a@h/1", "password": "b"}, "given twice"),
        ("redis://h/1?max_connections=many", "max_connections"),
        ("redis://h/1?sokcet_keepalive=1", "did you mean 'socket_keepalive'"),
        ("mem://?sise=3", "did you mean 'size'"),
        ("mem://?pickle_type=sqlalchemy", "pickle_type"),
    ],
)
def test_backend_options_that_break_the_rules_are_refused_with_the_reason(backend, culprit):
    pytest.importorskip("redis")
    with pytest.raises(ConfigError, match=culprit):
        sqlacache.configure(backend)


def test_retry_on_timeout_is_accepted_and_said_to_have_no_effect(caplog):
    pytest.importorskip("redis")
    with caplog.at_level(logging.WARNING, logger="sqlacache"):
        backend = sqlacache.configure("redis://h/0?retry_on_timeout=true").config.backend
    assert "retry_on_timeout" not in backend.options and backend.ignored == ("retry_on_timeout",)
    assert "no effect" in caplog.text


def test_mem_backend_option_list_covers_the_installed_redis_py():
    pytest.importorskip("redis")
    from sqlacache import backend_config as config

    for scheme in ("redis", "rediss", "unix"):
        accepted = set(config.redis_option_parsers(scheme)) - set(config.FORBIDDEN_URL_OPTIONS)
        missing = accepted - config.REDIS_OPTION_NAMES
        assert not missing, f"mem:// would reject these redis-py options: {sorted(missing)}"


# -- Manual control -------------------------------------------------------------------------------


async def test_manual_execute_caches_a_statement(make_cache, sessions, sql):
    cache = await make_cache(models={})  # nothing cached by configuration
    await seed(sessions)
    stmt = select(User).where(User.active == True)  # noqa: E712

    async def run() -> None:
        async with sessions() as s:
            (await cache.execute(s, stmt, timeout=300)).scalars().all()

    await run()
    assert await selects_of(sql, run) == 0


async def test_manual_invalidate_rows_model_and_all(cache, sessions, sql):
    await seed(sessions)
    for call in (
        lambda: cache.invalidate(User, pks=[42, 99]),
        lambda: cache.invalidate(model=User, pks=[42]),
        lambda: cache.invalidate(User, pks=42),
        lambda: cache.invalidate(User),
        lambda: cache.invalidate_all(),
        lambda: cache.invalidate(),
        lambda: cache.invalidate(None),
    ):
        await assert_get_is_cached(sessions, sql)
        await call()
        assert await selects_of(sql, lambda: get_user(sessions)) == 1, "the entry was not evicted"


async def test_invalidate_of_other_rows_keeps_the_entry(cache, sessions, sql):
    await seed(sessions)
    await assert_get_is_cached(sessions, sql)
    await cache.invalidate(User, pks=99)
    assert await selects_of(sql, lambda: get_user(sessions)) == 0


def test_pks_argument_forms():
    from sqlacache.invalidation import pks_list

    assert pks_list(42) == [42]
    assert pks_list("ab") == ["ab"]  # one key, not two characters
    assert pks_list([42, 99]) == [42, 99]
    assert pks_list([("AB", 1)]) == [("AB", 1)]


async def test_invalidate_a_composite_key(cache, sessions, sql):
    async with sessions() as s:
        s.add_all([Seat(row="AB", number=1), Seat(row="AB", number=2)])
        await s.commit()

    async def seat() -> None:
        async with sessions() as s:
            await s.get(Seat, ("AB", 1))

    await seat()
    assert await selects_of(sql, seat) == 0
    await cache.invalidate(Seat, pks=[("AB", 2)])
    assert await selects_of(sql, seat) == 0, "another row's key evicted the entry"
    await cache.invalidate(Seat, pks=[("AB", 1)])
    assert await selects_of(sql, seat) == 1


async def test_invalidate_with_pks_but_no_model_fails_clearly(cache):
    with pytest.raises(ConfigError, match="needs the model"):
        await cache.invalidate(pks=[1])
    with pytest.raises(ConfigError, match="not a mapping"):
        await cache.invalidate(User, pks={"id": 1})


# -- Compatibility details: imports, config mapping, hooks, aliases -------------------------------


def test_upstream_import_paths():
    from sqlacache.config import configure
    from sqlacache.exceptions import CacheError, ConfigError, TransportError

    assert issubclass(ConfigError, CacheError) and issubclass(TransportError, CacheError)
    assert ConfigError is sqlacache.ConfigError
    cache = configure(backend="mem://", models={"*": {"timeout": 5}})
    assert isinstance(cache, sqlacache.CacheManager)


def test_config_reads_as_upstreams_dict_and_as_attributes():
    models = {"tests.models.User": {"ops": {"get"}, "timeout": 900}, "*": {"timeout": 60}}
    cache = sqlacache.configure(backend="mem://", models=models, prefix="app", default_timeout=7)
    config = cache.config
    assert config["prefix"] == "app" == config.prefix
    assert config["default_timeout"] == 7 == config.default_timeout
    assert config["models"] == models and config["wildcard"] == {"timeout": 60}
    assert config["backend"] == "mem://" and config.backend.scheme == "mem"
    assert config.get("serializer") == "sqlalchemy" and "prefix" in config
    assert {"backend", "models", "prefix", "default_timeout"} <= set(config.keys())
    with pytest.raises(KeyError):
        config["nope"]


async def test_hooks_receive_the_model_class(make_cache, sessions):
    seen: list[tuple[Any, str]] = []
    cache = await make_cache(models={"tests.models.User": {}})
    cache.on_hit = lambda model, op: seen.append((model, op))
    cache.on_miss = lambda model, op: seen.append((model, op))
    await seed(sessions)
    await get_user(sessions)
    await get_user(sessions)
    assert seen == [(User, "get"), (User, "get")]


async def test_skip_interceptor_alias_and_flush_pending(cache, sessions, sql):
    await seed(sessions)
    stmt = select(User).where(User.id > 1).execution_options(sqlacache_skip_interceptor=True)

    async def run() -> None:
        async with sessions() as s:
            (await s.execute(stmt)).all()

    await run()
    assert await selects_of(sql, run) == 1
    async with sessions() as s:
        await s.execute(update(User).where(User.id == 42).values(name="bulk"))
        await s.commit()
    await cache.flush_pending()
    assert await get_user(sessions) == "bulk"


async def test_unmatched_module_pattern_warns_at_bind(make_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="sqlacache"):
        await make_cache(models={"tests.fixtures.*": {}, "tests.models.*": {}})
    assert "'tests.fixtures.*' matches no mapped class" in caplog.text
    assert "tests.models.*" not in caplog.text


def test_unknown_op_in_is_enabled_is_named():
    cache = sqlacache.configure("mem://", models={"*": {}})
    with pytest.raises(ConfigError, match="did you mean 'fetch'"):
        cache.is_enabled(User, "fecth")
