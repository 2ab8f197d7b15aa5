"""tests/test_isolation.py on Redis Cluster + PostgreSQL."""

from tests.test_isolation import *  # noqa: F403
