"""tests/test_sync.py on Redis Cluster + PostgreSQL."""

from tests.test_sync import *  # noqa: F403
