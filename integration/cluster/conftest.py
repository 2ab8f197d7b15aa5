"""The rule suites of tests/ again, on PostgreSQL and a local Redis Cluster (3 masters, 3
replicas) started for the session: the `stack` fixture points the cache at the cluster."""

from __future__ import annotations

import os

import pytest

from integration.clusterkit import LocalCluster
from integration.conftest import PG_URL, services_problems
from tests.fixtures import Stack


@pytest.fixture
def stack(redis_cluster: LocalCluster) -> Stack:
    problems = [p for p in services_problems() if p.startswith("PostgreSQL")]
    if problems:
        message = "integration services unreachable: " + "; ".join(problems)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(message)
    # redis_url stays None: tests that inspect one Redis server directly do not apply
    return Stack(name="redis-cluster", db_url=PG_URL, backend=redis_cluster.url)
