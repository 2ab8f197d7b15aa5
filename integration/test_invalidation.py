"""tests/test_invalidation.py on Redis + PostgreSQL."""

from tests.test_invalidation import *  # noqa: F403
