"""tests/test_upstream_compat.py on Redis + PostgreSQL, plus what only a real Redis can show."""

from __future__ import annotations

import pytest

from integration.faultkit import redis_server
from tests.test_upstream_compat import *  # noqa: F403
from tests.test_upstream_compat import assert_get_is_cached, seed


async def test_password_from_the_backend_mapping_reaches_redis(make_cache, sessions, sql):
    """Upstream's {"url": ..., "password": ...} form, on a private server that requires it."""
    import redis

    with redis_server() as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", "s3cret-pass")
        admin.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url).ping()
        cache = await make_cache(backend={"url": server.url, "password": "s3cret-pass"})
        await seed(sessions)
        await assert_get_is_cached(sessions, sql)
        assert cache.stats()["circuit_breaker"]["state"] == "closed"
        assert cache.stats()["transport_errors"] == 0
        await cache.disconnect()
