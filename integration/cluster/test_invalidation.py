"""tests/test_invalidation.py on Redis Cluster + PostgreSQL."""

from tests.test_invalidation import *  # noqa: F403
