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


async def test_unix_socket_backend_with_db_in_the_query(make_cache, sessions, sql, tmp_path):
    import shutil
    import subprocess
    import time

    import redis

    socket_path = tmp_path / "redis.sock"
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--save", "", "--dir",
         str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "redis-server did not open its socket"
            time.sleep(0.05)
        cache = await make_cache(backend=f"unix://{socket_path}?db=3")
        await seed(sessions)
        await assert_get_is_cached(sessions, sql)
        client = redis.Redis(unix_socket_path=str(socket_path), db=3)
        assert client.dbsize() > 0, "the entries must be in the database the query named"
        client.close()
        await cache.disconnect()
    finally:
        proc.kill()
        proc.wait(timeout=10)
