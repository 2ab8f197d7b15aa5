"""The cashews bridge on Redis Cluster + PostgreSQL: tests/test_cashews_bridge.py again, cashews on
the same cluster (its `?cluster=true` backend), and in-process cashews caches of two OS processes
kept fresh over the cluster's pub/sub."""

from __future__ import annotations

import uuid

from cashews import Cache

from integration.test_cashews_bridge import (  # noqa: F401 - run again on the cluster
    test_in_process_cashews_caches_of_two_processes_follow_each_others_commits,
)
from tests.models import User
from tests.test_cashews_bridge import *  # noqa: F403
from tests.test_cashews_bridge import cached_endpoints


async def test_a_function_cached_by_cashews_on_the_cluster_stays_fresh(stack, make_cache, sessions):
    app_cache = Cache(name=f"c{uuid.uuid4().hex[:6]}")
    app_cache.setup(stack.backend)  # the same cluster: cashews spells it `?cluster=true` too
    cache = await make_cache(cashews=app_cache)
    user_name, user_count, calls = cached_endpoints(app_cache, sessions)
    try:
        async with sessions() as s:
            s.add(User(id=1, name="a"))
            await s.commit()
        assert await user_name(1) == "a"
        assert await user_name(1) == "a"
        assert calls["user"] == 1  # the second call came from cashews, on the cluster
        assert await user_count() == 1
        async with sessions() as s:
            user = await s.get(User, 1)
            user.name = "b"
            s.add(User(id=2, name="c"))
            await s.commit()
        assert await user_name(1) == "b"
        assert await user_count() == 2
        assert calls == {"user": 2, "count": 2}
        stats = cache.stats()["cashews"]
        assert stats["tags_deleted"] > 0 and stats["errors"] == 0 and stats["pending"] == 0
    finally:  # its keys expire with the session's cluster (no FLUSHDB: other tests' keys)
        await app_cache.close()
