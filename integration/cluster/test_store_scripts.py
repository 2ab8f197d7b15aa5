"""integration/test_store_scripts.py on the cluster: the same rules for a fill split into its
version half (lua/fill_versions.lua on the meta slot) and the entry's SET on its own node.

The rule tests name their keys through `k()`; here every key carries one hash tag, so the
version keys of each test share a slot as a namespace's do (the entry then shares it too, which
the rules do not depend on; entries on other nodes are covered by test_cluster.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio.cluster as aiocluster

import integration.test_store_scripts as rules
from integration.test_store_scripts import *  # noqa: F403
from sqlacache.backends.cluster import ClusterStore
from sqlacache.config import parse_backend
from tests.fixtures import Stack


@pytest.fixture
async def redis_pair(  # type: ignore[no-redef]
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ClusterStore, Any]]:
    monkeypatch.setattr(rules, "PREFIX", "{sqlacache-script-test}")
    store = ClusterStore(parse_backend(stack.backend), operation_timeout=2.0)
    raw = aiocluster.RedisCluster.from_url(stack.backend.split("?")[0])
    await rules._clear(raw)
    try:
        yield store, raw
    finally:
        await rules._clear(raw)
        await raw.aclose()
        await store.aclose()


def test_sync_store_runs_the_same_script(  # type: ignore[no-redef]
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.cluster

    monkeypatch.setattr(rules, "PREFIX", "{sqlacache-script-test}")
    store = ClusterStore(parse_backend(stack.backend), operation_timeout=2.0)
    raw = redis.cluster.RedisCluster.from_url(stack.backend.split("?")[0])
    try:
        store.store(rules.fill(init=[(rules.k("sync-table"), b"t1", None)]))
        assert raw.get(rules.k("entry")) == b"payload"
        assert raw.get(rules.k("sync-table")) == b"t1"
        store.store(
            rules.fill(entry_key=rules.k("e2"), init=[(rules.k("sync-table"), b"t2", None)])
        )
        assert raw.get(rules.k("e2")) is None, "an entry whose version is not its token"
    finally:
        for key in raw.scan_iter(match="{sqlacache-script-test}:*"):
            raw.delete(key)
        raw.close()
        store.close()
