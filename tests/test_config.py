"""Bad configuration fails at configure() (or bind(), for what needs imports), naming the culprit."""

from __future__ import annotations

import pytest

import sqlacache
from sqlacache import ConfigError
from tests.catalog import Product
from tests.models import Manager, User


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"models": {"tests.models.User": {"tiemout": 5}}}, "did you mean 'timeout'"),
        ({"models": {"tests.models.User": {"ops": {"get", "fecth"}}}}, "unknown op 'fecth'"),
        ({"models": {"tests.models.User": {"ops": "get"}}}, "did you mean {'get'}"),
        ({"models": {"tests.models.User": {"ops": "everything"}}}, "'everything'"),
        ({"models": {"tests.models.User": {"timeout": 0}}}, "timeout"),
        ({"models": {"tests.models.User": {"timeout": -3}}}, "-3"),
        ({"models": {"tests.models.User": {"timeout": 2.5}}}, "2.5"),
        ({"models": {"tests.models.User": {"lock": "yes"}}}, "lock"),
        ({"models": {"User": {}}}, "'User'"),
        ({"models": {"tests.models.*.x": {}}}, "tests.models.*.x"),
        ({"models": {"tests.models.User": 5}}, "models['tests.models.User']"),
        ({"models": {42: {}}}, "42"),
        ({"models": ["tests.models.User"]}, "models must be a dict"),
        ({"default_timeout": 0}, "default_timeout"),
        ({"prefix": "bad prefix!"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"backend": "memcached://localhost"}, "unknown backend scheme 'memcached'"),
        ({"backend": "localhost:6379"}, "backend must be a URL"),
        ({"backend": {"host": "x"}}, "'url'"),
        ({"backend": "redis://localhost/0?pickle_type=sqlalchemy"}, "pickle_type"),
        ({"backend": "redis://localhost/0?suppress=true"}, "suppress"),
        ({"backend": "redis://localhost/0?client_side=true"}, "client_side"),
        ({"backend": "redis://localhost/0?digestmod=md5"}, "digestmod"),
        ({"backend": "redis://localhost/0?socket_timout=1"}, "socket_timout"),
        ({"serializer": "yaml"}, "unknown serializer 'yaml'"),
        ({"serializer": "pickle"}, "requires secret"),
        ({"compress": "brotli"}, "compress"),
        ({"secret": "short"}, "secret"),
        ({"volatile_functions": "now"}, "volatile_functions"),
        ({"key_context": "tenant"}, "key_context"),
        ({"operation_timeout": 0}, "operation_timeout"),
        ({"max_rows": 0}, "max_rows"),
    ],
)
def test_bad_configuration_raises_config_error_naming_the_culprit(kwargs, culprit):
    with pytest.raises(ConfigError) as info:
        sqlacache.configure(**{"backend": "mem://", **kwargs})
    assert culprit in str(info.value)


def test_config_error_is_a_cache_error():
    assert issubclass(ConfigError, sqlacache.CacheError)


@pytest.mark.parametrize(
    ("models", "culprit"),
    [
        ({"tests.models.Userr": {}}, "has no 'Userr'"),
        ({"no_such_package.models.User": {}}, "no_such_package.models.User"),
        ({"no_such_module.*": {}}, "no_such_module"),
        ({"tests.models.Status": {}}, "not a mapped class"),
    ],
)
async def test_unknown_dotted_paths_fail_at_bind(engine, models, culprit):
    cache = sqlacache.configure("mem://", models=models)
    with pytest.raises(ConfigError) as info:
        await cache.bind(engine)
    assert culprit in str(info.value)
    await cache.disconnect()


def test_accepts_upstream_style_configuration():
    cache = sqlacache.configure(
        backend={"url": "redis://localhost:6379/1", "socket_timeout": 0.1},
        models={
            "tests.models.User": {"ops": {"get", "fetch"}, "timeout": 900},
            "tests.catalog.Product": {"ops": "all", "timeout": 3600},
            "*": {"timeout": 3600},
        },
        prefix="app",
        default_timeout=3600,
        serializer="sqlalchemy",
    )
    assert isinstance(cache, sqlacache.CacheManager)
    assert cache.config.backend.options["socket_timeout"] == 0.1


def test_pickle_serializer_is_allowed_with_a_secret():
    sqlacache.configure("mem://", serializer="pickle", secret="0123456789abcdef")


def test_policy_most_specific_entry_wins_field_by_field():
    cache = sqlacache.configure(
        "mem://",
        models={
            "*": {"timeout": 100, "ops": {"get"}},
            "tests.models.*": {"timeout": 50},
            User: {"ops": {"fetch"}},
        },
        default_timeout=7,
    )
    config = cache.config
    user = config.policy_for(User.__mapper__)
    assert user.ops == {"fetch"} and user.timeout == 50
    product = config.policy_for(Product.__mapper__)  # another module: only "*"
    assert product.ops == {"get"} and product.timeout == 100


def test_class_entry_covers_its_mapped_subclasses():
    from tests.models import Employee

    cache = sqlacache.configure("mem://", models={Employee: {"timeout": 11, "ops": {"get"}}})
    assert cache.config.policy_for(Manager.__mapper__).timeout == 11


def test_none_disables_and_missing_models_are_not_cached():
    cache = sqlacache.configure("mem://", models={"tests.models.User": None, "tests.catalog.*": {}})
    config = cache.config
    assert not config.policy_for(User.__mapper__).enabled
    assert config.policy_for(Product.__mapper__).allows("count")
    assert not config.policy_for(Manager.__mapper__).enabled


def test_default_ops_are_all_and_default_timeout_applies():
    cache = sqlacache.configure("mem://", models={"tests.models.User": {}}, default_timeout=42)
    policy = cache.config.policy_for(User.__mapper__)
    assert policy.ops == {"get", "fetch", "count", "exists"} and policy.timeout == 42


def test_configure_connects_to_nothing():
    # an unreachable Redis is fine until bind(), and even then reads just use the database
    sqlacache.configure("redis://127.0.0.1:1/0", models={"*": {}})
