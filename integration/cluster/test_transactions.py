"""tests/test_transactions.py on Redis Cluster + PostgreSQL."""

from tests.test_transactions import *  # noqa: F403
