"""tests/test_transactions.py on Redis + PostgreSQL."""

from tests.test_transactions import *  # noqa: F403
