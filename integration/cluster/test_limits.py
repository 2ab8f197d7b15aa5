"""tests/test_limits.py on Redis Cluster + PostgreSQL."""

from tests.test_limits import *  # noqa: F403
