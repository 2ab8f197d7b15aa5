"""tests/test_limits.py on Redis + PostgreSQL."""

from tests.test_limits import *  # noqa: F403
